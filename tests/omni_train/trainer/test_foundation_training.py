"""Foundation backbones end to end, each family on its own VAE family's latents: all three
curriculum stages on 2 ranks with ZeRO-2 (full) and ZeRO-3 (LoRA); the LoRA run is killed
(-9) and restarted and continues with the losses of an uninterrupted run; sampling and
evaluation through the usual entry points."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import av
import pytest

from omni_train.testing import SIX_STEP_STAGES, SMALL_CLIPS, metric_rows, run_ranks, train_in_rank

pytest.importorskip("diffusers", reason="the foundation extra (diffusers) is not installed")
pytestmark = pytest.mark.slow
MAX_STEPS = 6
KILL_AT = 3  # after the step-2 checkpoint: the restart redoes step 3

# (experiment, ZeRO stage, fine-tuning mode): each family with ZeRO-2 and ZeRO-3, full and lora.
CASES = [
    ("wan_smoke", 2, "full"),
    ("wan_smoke", 3, "lora"),
    ("hunyuan_video_smoke", 2, "full"),
    ("hunyuan_video_smoke", 3, "lora"),
]


def _overrides(run_dir: Path, shards: str, experiment: str, zero: int, mode: str) -> list[str]:
    return [
        f"experiment={experiment}",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=2",
        f"trainer.zero_stage={zero}",
        f"trainer.finetune.mode={mode}",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
        *SMALL_CLIPS,
        *SIX_STEP_STAGES,
    ]


def _train_killed_at(overrides: list[str], step: int) -> int:
    """Train in this forked rank and SIGKILL it when it is about to take ``step``."""
    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    train_step = trainer._train_step

    def killing_step(batches, flag):
        if trainer.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(batches, flag)

    trainer._train_step = killing_step
    trainer.run()
    dist.destroy_process_group()
    return trainer.global_step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipelines.testing import build_sample_shards

    return build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=0)


@pytest.mark.parametrize(("experiment", "zero", "mode"), CASES)
def test_three_stages_then_resume_sample_and_evaluate(corpus, tmp_path, experiment, zero, mode):
    """Full fine-tuning: trained, then sampled and evaluated. LoRA: also killed and restarted,
    its checkpoint read, and sampled from (the adapters on their base)."""
    shards = str(corpus / "shards" / "*.tar")
    reference_dir = tmp_path / "uninterrupted"
    reference = _overrides(reference_dir, shards, experiment, zero, mode)
    assert run_ranks(train_in_rank, 2, reference) == [MAX_STEPS] * 2
    want = metric_rows(reference_dir)
    assert [r["stage"] for r in want] == [1, 1, 2, 2, 3, 3]
    assert [r["active_pose"] > 0 for r in want] == [False] * 4 + [True] * 2
    if mode == "full":
        _sample(reference_dir, corpus, tmp_path)
        _evaluate(reference_dir, shards, tmp_path)
        return

    run_dir = tmp_path / "run"
    overrides = _overrides(run_dir, shards, experiment, zero, mode)
    with pytest.raises(RuntimeError, match="exit code -9"):
        run_ranks(_train_killed_at, 2, overrides, KILL_AT)
    assert run_ranks(train_in_rank, 2, overrides) == [MAX_STEPS] * 2
    got = metric_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    for row, expected in zip(got, want, strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5), row["step"]
    _assert_holds_only_what_trained(run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}")
    _sample(run_dir, corpus, tmp_path)


def _assert_holds_only_what_trained(step_dir: Path) -> None:
    """A LoRA run's weights file: the adapters and the omni modules, no base weight, and the
    base it adapts named in its header."""
    from safetensors import safe_open

    with safe_open(str(step_dir / "model.safetensors"), "pt") as weights:
        names, header = list(weights.keys()), weights.metadata()
    adapters = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    assert adapters and all(n.startswith("base.") for n in adapters)
    assert not [n for n in names if n.startswith("base.") and n not in adapters]
    assert "base_model" in header


def _sample(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from omni_train.config import SampleConfig
    from omni_train.sample import run_sampling

    clips = sorted((corpus.parent / "corpus").glob("*.mp4"))
    clip = next(p for p in clips if "broken" not in p.name)
    # 3 s at 8 fps: two segments, the second continuing from the first's motion frames.
    written = run_sampling(
        SampleConfig(
            checkpoint=str(run_dir),
            ref_image=str(clip),
            audio=str(clip),
            out=str(tmp_path / "sample.mp4"),
            seconds=3.0,
            sampling_steps=2,
        )
    )
    with av.open(str(written)) as container:
        assert container.streams.audio
        assert sum(1 for _ in container.decode(video=0)) == 24


def _evaluate(run_dir: Path, shards: str, tmp_path: Path) -> None:
    from omni_train.evaluation.config import EvaluateConfig
    from omni_train.evaluation.harness import evaluate
    from omni_train.evaluation.suite import MetricsConfig

    cfg = EvaluateConfig(
        checkpoint=str(run_dir),
        shards=shards,
        out=str(tmp_path / "eval"),
        num_clips=1,
        seconds=17 / 8,
        sampling_steps=1,
        grid=False,
        wandb=False,
        metrics=MetricsConfig(enabled=["fidelity"]),
    )
    report = json.loads(evaluate(cfg).read_text())
    assert report["checkpoint"]["step"] == MAX_STEPS
    [row] = report["clips"]
    assert row["frames_generated"] == 17
    assert row["metrics"]["generated"]["psnr"]["value"] > 0
