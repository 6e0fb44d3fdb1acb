"""End to end on 2 forked ranks: shard the sample corpus, train through the three curriculum
stages, stop, resume, and see the same losses as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.testing import (
    SIX_STEP_STAGES,
    compose_train_config,
    metric_rows,
    run_ranks,
    train_in_rank,
)
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

STAGES = [*SIX_STEP_STAGES, "curriculum.motion_frame_ratio=0.5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=0)
    assert len(list((data / "shards").glob("*.tar"))) >= 2
    return str(data / "shards" / "*.tar")


def _overrides(run_dir: Path, shards: str, max_steps: int, wandb: bool) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=3",
        f"logger.wandb.enabled={str(wandb).lower()}",
        "diffusion.sampling_steps=2",
        *STAGES,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards) -> Path:
    run_dir = tmp_path_factory.mktemp("run_full")
    assert run_ranks(train_in_rank, 2, _overrides(run_dir, shards, 6, wandb=False)) == [6, 6]
    return run_dir


def test_stages_switch_conditions_on_in_order(uninterrupted):
    rows = metric_rows(uninterrupted)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3]
    for row in rows:
        assert row["batch_size"] == 4  # 2 ranks x 2
        assert row["active_text"] + row["active_ref"] > 0
        if row["stage"] == 1:
            assert row["active_audio"] == 0 and row["active_pose"] == 0
        if row["stage"] == 2:
            assert row["active_pose"] == 0
    # Realised ratios per stage sit beside the configured ones (stages 2-3 set audio to 1.0).
    assert rows[1]["stage1/target_ratio_audio"] == 0.0 and rows[1]["stage1/ratio_audio"] == 0.0
    assert rows[5]["stage3/target_ratio_pose"] == 1.0
    assert rows[5]["stage3/ratio_audio"] == pytest.approx(1.0)
    later = [r for r in rows if r["stage"] >= 2]
    assert sum(r["active_audio"] for r in later) > 0
    assert all(r["loss"] > 0 for r in rows)
    assert (uninterrupted / "config.yaml").is_file()
    assert (uninterrupted / "deepspeed_config.json").is_file()
    names = sorted(p.name for p in (uninterrupted / "checkpoints").glob("step_*"))
    assert names == ["step_00000003", "step_00000006"]
    for name in names:
        assert (uninterrupted / "checkpoints" / name / "model.safetensors").is_file()


def test_stop_and_resume_gives_the_same_losses(uninterrupted, shards, tmp_path):
    run_dir = tmp_path / "run"
    assert run_ranks(train_in_rank, 2, _overrides(run_dir, shards, 3, wandb=True)) == [3, 3]
    first_id = json.loads((run_dir / "wandb_run_id.json").read_text())
    assert run_ranks(train_in_rank, 2, _overrides(run_dir, shards, 6, wandb=True)) == [6, 6]

    resumed, full = metric_rows(run_dir), metric_rows(uninterrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        for cond in ("text", "ref", "audio", "pose"):
            assert a[f"active_{cond}"] == b[f"active_{cond}"]
    assert json.loads((run_dir / "wandb_run_id.json").read_text()) == first_id
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and all(str(first_id["id"]) in p.name for p in offline_runs)


@pytest.fixture(scope="module")
def clip(uninterrupted) -> Path:
    """A clip of the sample corpus, as reference image and audio for sampling."""
    corpus = sorted(Path(uninterrupted).parent.glob("corpus*/corpus/*.mp4"))
    return next(p for p in corpus if "broken" not in p.name)


def _sampled_frames(
    checkpoint: Path, clip: Path, out: Path, seconds: float, sampling_steps: int
) -> int:
    """Sample from ``checkpoint`` (a run dir or a step folder) with ``clip`` as reference and
    audio; the mp4's frame count (it must have an audio track)."""
    from omni_train.config import SampleConfig
    from omni_train.sample import run_sampling

    written = run_sampling(
        SampleConfig(
            checkpoint=str(checkpoint),
            ref_image=str(clip),
            audio=str(clip),
            out=str(out),
            seconds=seconds,
            sampling_steps=sampling_steps,
        )
    )
    with av.open(str(written)) as container:
        assert container.streams.audio, "the sample has no audio track"
        return sum(1 for _ in container.decode(video=0))


def test_sampling_from_the_trained_run_writes_an_mp4_with_audio(uninterrupted, clip, tmp_path):
    # 4 s at 8 fps: 17-frame segments, each later one adds 12.
    assert _sampled_frames(Path(uninterrupted), clip, tmp_path / "out.mp4", 4.0, 2) == 32


class _Killed(Exception):
    pass


def _killed_before_the_first_update(overrides: list[str]) -> int:
    """Train in this rank as if killed right after the start (step-0 save, if asked for)."""
    import torch.distributed as dist

    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)

    def killed(*_):
        raise _Killed

    trainer._train_step = killed
    try:
        trainer.run()
    except _Killed:
        pass
    dist.destroy_process_group()
    return trainer.global_step


def test_the_untrained_step_0_checkpoint_resumes_like_a_run_that_never_stopped(
    uninterrupted, shards, clip, tmp_path
):
    import torch

    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.sample import load_run

    run_dir = tmp_path / "run"
    overrides = [
        *_overrides(run_dir, shards, 6, wandb=False),
        "trainer.save_at_start=true",
        "trainer.keep_last=1",
    ]
    assert run_ranks(_killed_before_the_first_update, 2, overrides) == [0, 0]
    root = run_dir / "checkpoints"
    step0 = root / "step_00000000"
    assert [p.name for p in root.glob("step_*")] == [step0.name]
    for name in ("model.safetensors", "frozen.safetensors", "config.yaml", "rng_rank00001.json"):
        assert (step0 / name).is_file(), name
    for rank in range(2):
        loader = json.loads((step0 / f"loader_rank{rank:05d}.json").read_text())
        assert loader["batches"] == 0 and [w["yielded"] for w in loader["workers"]] == [0]
    meta = ckpt.read_meta(step0)
    assert (meta["step"], meta["reason"], meta["pinned"]) == (0, "start", True)

    assert run_ranks(train_in_rank, 2, overrides) == [6, 6]
    resumed, full = metric_rows(run_dir), metric_rows(uninterrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
    # keep_last=1 pruned step 3 but not step 0, which the resumed run did not save again.
    assert sorted(p.name for p in root.glob("step_*")) == [step0.name, "step_00000006"]
    assert ckpt.read_meta(step0) == meta
    assert ckpt.latest_checkpoint(root).name == "step_00000006"

    # The step folder samples, with the untrained weights the trainer started from.
    cfg, _ = compose_train_config(overrides)
    torch.manual_seed(cfg.seed)
    build_frozen_encoders(cfg.model)
    initial = build_denoiser(cfg.model).state_dict()
    loaded = load_run(step0).denoiser.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in initial.items())
    # At least two 17-frame segments whatever the length asked for.
    assert _sampled_frames(step0, clip, tmp_path / "untrained.mp4", 2.0, 1) == 29
