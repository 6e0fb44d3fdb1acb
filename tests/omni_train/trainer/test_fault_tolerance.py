"""kill -9 at a random step or during a save, SIGTERM/SIGUSR1 preemption, NaN losses: each
restart resumes by itself and continues with the losses of an uninterrupted run.

The random choices (the step to kill at, the point of a save to kill in) are seeded by the
environment variable OMNI_FAULT_SEED (default 0; tests/omni_train/conftest.py). A failure
names the seed; rerun with it to replay the same faults, or set another seed to try others:

    OMNI_FAULT_SEED=7 .venv/bin/pytest tests/omni_train/trainer/test_fault_tolerance.py
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.testing import SIX_STEP_STAGES, metric_rows, run_ranks
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow
MAX_STEPS = 6
STAGES = list(SIX_STEP_STAGES)


def run_overrides(run_dir: Path, shards: str, max_steps: int, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=2",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
        *STAGES,
        *extra,
    ]


@pytest.fixture(scope="module")
def trainer_shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=0)
    assert len(list((data / "shards").glob("*.tar"))) >= 2
    return str(data / "shards" / "*.tar")


def _train(overrides: list[str], fault: tuple[str, int] | None = None):
    """Train in a forked rank; ``fault`` = (kind, step) injects one failure."""
    import torch
    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer import checkpoint_manager, run_state
    from omni_train.trainer import trainer as trainer_module
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    rank = dist.get_rank()
    kind, at = fault or ("", -1)
    train_step = trainer._train_step

    def faulty_step(batches, flag):
        if kind == "kill" and trainer.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind in ("SIGTERM", "SIGUSR1") and trainer.global_step == at and rank == 0:
            os.kill(os.getpid(), getattr(signal, kind))  # reaches rank 0 only
        return train_step(batches, flag)

    trainer._train_step = faulty_step
    if kind.startswith("kill_in_save:"):
        point = kind.split(":", 1)[1]
        module, name = {
            "after_deepspeed": (run_state, "capture_rng"),
            "before_weights": (checkpoint_manager, "consolidated_state"),
        }[point]
        original = getattr(module, name)

        def killing(*args, **kwargs):
            if trainer.global_step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, name, killing)
    if kind == "nan":
        compute = trainer_module.compute_loss

        def nan_loss(*args, **kwargs):
            result = compute(*args, **kwargs)
            # Steps listed in ``at`` (a bitmask of 0-based step indices) get a NaN loss.
            if (at >> trainer.global_step) & 1 and rank == 1:
                result.loss = result.loss * torch.tensor(float("nan"))
            return result

        trainer_module.compute_loss = nan_loss
    try:
        trainer.run()
        outcome = ("finished", 0)
    except SystemExit as stop:
        outcome = ("exit", stop.code)
    except RuntimeError as err:
        outcome = ("error", str(err))
    step = trainer.global_step
    dist.destroy_process_group()
    return (*outcome, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trainer_shards) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    results = run_ranks(_train, 2, run_overrides(run_dir, trainer_shards, MAX_STEPS))
    assert results == [("finished", 0, MAX_STEPS)] * 2
    return metric_rows(run_dir)


def _assert_same_losses(run_dir: Path, reference: list[dict], fault: str = "") -> None:
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), fault
    for got, want in zip(rows, reference, strict=True):
        where = f"step {got['step']}; {fault}"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), where
        assert got["active_audio"] == want["active_audio"], where


def test_kill_9_at_a_random_step_then_restart_gives_identical_losses(
    reference, trainer_shards, tmp_path, fault_rng
):
    kill_at = fault_rng.randint(1, MAX_STEPS - 1)
    fault = f"killed after step {kill_at} ({fault_rng.replay})"
    run_dir = tmp_path / "run"
    overrides = run_overrides(run_dir, trainer_shards, MAX_STEPS)
    with pytest.raises(RuntimeError, match="exit code -9"):
        run_ranks(_train, 2, overrides, ("kill", kill_at))
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert (newest is None) == (kill_at < 2), fault
    assert run_ranks(_train, 2, overrides) == [("finished", 0, MAX_STEPS)] * 2, fault
    _assert_same_losses(run_dir, reference, fault)


def test_kill_during_a_save_leaves_the_previous_checkpoint_newest(
    reference, trainer_shards, tmp_path, fault_rng
):
    point = fault_rng.choice(["after_deepspeed", "before_weights"])
    fault = f"killed in the step-4 save {point} ({fault_rng.replay})"
    run_dir = tmp_path / "run"
    overrides = run_overrides(run_dir, trainer_shards, MAX_STEPS)
    with pytest.raises(RuntimeError, match="exit code -9"):
        run_ranks(_train, 2, overrides, (f"kill_in_save:{point}", 4))
    root = run_dir / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_00000002", fault
    assert any(p.name.startswith(".staging_") for p in root.iterdir()), fault
    assert run_ranks(_train, 2, overrides) == [("finished", 0, MAX_STEPS)] * 2, fault
    assert not any(p.name.startswith(".staging_") for p in root.iterdir()), fault
    _assert_same_losses(run_dir, reference, fault)


def test_sigterm_saves_and_exits_with_the_requeue_code_then_resumes(
    reference, trainer_shards, tmp_path
):
    sig = "SIGTERM"  # SIGUSR1 takes the same path: tests/omni_train/trainer/test_preemption.py
    run_dir = tmp_path / "run"
    overrides = run_overrides(run_dir, trainer_shards, MAX_STEPS, "trainer.save_every=100")
    # Delivered to rank 0 only, before step 4: every rank still stops after step 4.
    assert run_ranks(_train, 2, overrides, (sig, 3)) == [("exit", 143, 4)] * 2
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))["reason"] == "preempted"
    assert (run_dir / "preempted.json").is_file()
    assert run_ranks(_train, 2, overrides) == [("finished", 0, MAX_STEPS)] * 2
    assert not (run_dir / "preempted.json").exists()
    _assert_same_losses(run_dir, reference)


def test_nan_losses_are_skipped_and_counted_and_k_in_a_row_stop_the_run(trainer_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(
        run_dir, trainer_shards, MAX_STEPS, "trainer.nonfinite.max_consecutive=2"
    )
    # Step index 1 alone is skipped; indices 3 and 4 in a row stop the run after step 5.
    mask = (1 << 1) | (1 << 3) | (1 << 4)
    results = run_ranks(_train, 2, overrides, ("nan", mask))
    for outcome, message, step in results:
        assert (outcome, step) == ("error", 5)
        assert "2 consecutive steps had a NaN/Inf loss" in message
        assert "last good weights" in message
    rows = metric_rows(run_dir)
    assert [r["update_skipped"] for r in rows] == [0, 1, 0, 1, 1]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 2, 3]
    stop = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert stop.name == "step_00000005"
    assert ckpt.read_meta(stop)["reason"] == "nonfinite"
    # Steps 4 and 5 applied no update: the stop checkpoint holds the weights after step 3,
    # as does the step-4 checkpoint written on cadence.
    from omni_train.models.weights import load_state_dict_file

    cadence = run_dir / "checkpoints" / "step_00000004" / "model.safetensors"
    after_step_3 = load_state_dict_file(cadence)
    stopped = load_state_dict_file(stop / "model.safetensors")
    assert all((after_step_3[k] == stopped[k]).all() for k in stopped)


def _train_nan_at_call(overrides: list[str], nan_call: int) -> int:
    """Train with the ``nan_call``-th micro-batch loss (1-based, per rank) made NaN."""
    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer import trainer as trainer_module
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    compute, calls = trainer_module.compute_loss, [0]

    def nan_loss(*args, **kwargs):
        result = compute(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nan_call:
            result.loss = result.loss * float("nan")
        return result

    trainer_module.compute_loss = nan_loss
    trainer.run()
    dist.destroy_process_group()
    return trainer.global_step


def test_a_nan_in_a_later_micro_batch_discards_the_earlier_ones_too(trainer_shards, tmp_path):
    """With gradient accumulation, a step whose 2nd micro-batch is NaN must leave no trace of
    its 1st: the next steps match a run whose NaN came in the 1st micro-batch (ZeRO-2 keeps
    partially reduced gradients that a plain zero_grad would carry into the next step)."""
    rows = {}
    for nan_call in (3, 4):  # step index 1: micro-batch 0, then micro-batch 1
        run_dir = tmp_path / f"nan_at_{nan_call}"
        overrides = run_overrides(
            run_dir, trainer_shards, 3, "trainer.grad_accum=2", "trainer.zero_stage=2"
        )
        assert run_ranks(_train_nan_at_call, 2, overrides, nan_call) == [3, 3]
        rows[nan_call] = metric_rows(run_dir)
    assert [r["update_skipped"] for r in rows[4]] == [0, 1, 0]
    assert rows[3][2]["grad_norm"] == pytest.approx(rows[4][2]["grad_norm"], rel=1e-6)
    assert rows[3][2]["loss"] == pytest.approx(rows[4][2]["loss"], rel=1e-6)
