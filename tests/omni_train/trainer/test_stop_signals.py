"""A stop signal at any moment of a run, delivered to every rank as slurm delivers it: during
start-up, during a save, during the validation loss. Each stops the run as early as it can
with a complete checkpoint, without a second save of the same step, and the resumed run has
the losses of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.testing import SIX_STEP_STAGES, metric_rows, run_ranks
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow
MAX_STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=3)
    return str(data / "shards" / "*.tar")


def _overrides(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=2",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
        *SIX_STEP_STAGES,
        *extra,
    ]


def _train(overrides: list[str], moment: str | None):
    """Train in a forked rank; SIGTERM reaches this rank at ``moment``."""
    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer import trainer as trainer_module
    from omni_train.trainer.trainer import Trainer

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    build_engine = trainer_module.build_engine
    if moment == "start-up":

        def signalled_build(*args, **kwargs):
            sigterm()  # the engine is not built yet: the default action would kill the rank
            return build_engine(*args, **kwargs)

        trainer_module.build_engine = signalled_build
    cfg, resolved = compose_train_config(overrides)
    try:
        trainer = Trainer(cfg, resolved)
    finally:
        trainer_module.build_engine = build_engine
    if moment == "save":
        save = trainer.save

        def signalled_save(reason: str = "cadence"):
            if trainer.global_step == 2 and reason == "cadence":
                sigterm()
            return save(reason)

        trainer.save = signalled_save
    if moment == "validation loss":
        val_metrics = trainer._val_metrics

        def signalled_val():
            sigterm()
            return val_metrics()

        trainer._val_metrics = signalled_val
    try:
        trainer.run()
        outcome = ("finished", 0)
    except SystemExit as stop:
        outcome = ("exit", stop.code)
    step = trainer.global_step
    dist.destroy_process_group()
    return (*outcome, step)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("heldout"), num_clips=2, seed=4)
    return str(data / "shards" / "*.tar")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert run_ranks(_train, 2, _overrides(run_dir, shards), None) == [("finished", 0, 4)] * 2
    return metric_rows(run_dir)


@pytest.mark.parametrize(
    ("moment", "extra", "stop_step", "reason"),
    [
        ("start-up", [], 1, "preempted"),
        # The cadence checkpoint of step 2 is the preemption checkpoint: not saved twice.
        ("save", [], 2, "cadence"),
        ("validation loss", ["trainer.val_every=2", "trainer.save_every=3"], 2, "preempted"),
    ],
)
def test_a_sigterm_stops_right_after_the_work_it_interrupted(
    shards, val_shards, reference, tmp_path, moment, extra, stop_step, reason
):
    run_dir = tmp_path / "run"
    if extra:
        extra = [*extra, f"data.val_shards={val_shards}"]
    overrides = _overrides(run_dir, shards, *extra)
    assert run_ranks(_train, 2, overrides, moment) == [("exit", 143, stop_step)] * 2
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == f"step_{stop_step:08d}"
    assert ckpt.read_meta(latest)["reason"] == reason
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert (marker["step"], marker["signal"], marker["exit_code"]) == (stop_step, "SIGTERM", 143)
    assert 0 <= marker["save_seconds"] <= marker["seconds_since_signal"]
    assert run_ranks(_train, 2, overrides, None) == [("finished", 0, MAX_STEPS)] * 2
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    for got, want in zip(rows, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), got["step"]
