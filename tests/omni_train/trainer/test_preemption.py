from __future__ import annotations

import os
import signal

import pytest

from omni_train.trainer.preemption import SignalFlag


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_configured_signal_is_recorded_not_fatal(name):
    flag = SignalFlag(["SIGTERM", "SIGUSR1"])
    try:
        assert not flag.raised
        os.kill(os.getpid(), getattr(signal, name))
        assert flag.raised and flag.received == name
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_unknown_signal_name_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.preemption.signals.*SIGTREM"):
        SignalFlag(["SIGTREM"])


def test_progress_line_and_mfu_figures():
    from omni_train.trainer.progress import format_duration, progress_line
    from omni_train.trainer.throughput import detect_peak_tflops, mfu

    row = {"step": 5, "stage": 2, "loss": 0.5, "lr": 1e-4, "samples_per_s": 3.0, "mfu": 0.41}
    line = progress_line(row, 10, 75.0, width=10)
    assert line.startswith("[#####-----] 5/10") and "mfu 41.0%" in line and "eta 1:15" in line
    assert format_duration(3725) == "1:02:05"
    assert detect_peak_tflops(2.5, "bf16") == 2.5
    assert mfu(1e12, 2.0, 4, 1.0) == pytest.approx(0.5)


def test_sigusr2_is_a_default_preemption_signal():
    from omni_train.trainer.config import PreemptionConfig

    # submitit (hydra/launcher=slurm_gpu) warns a job with SIGUSR2 before its time limit.
    assert "SIGUSR2" in PreemptionConfig().signals


def test_a_python_handler_installed_before_is_deferred_to_restore():
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        flag = SignalFlag(["SIGTERM", "SIGUSR2"])
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.received == "SIGUSR2" and calls == []
        flag.restore()
        assert calls == [signal.SIGUSR2]
        flag.restore()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_no_signal_means_no_deferred_call():
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        SignalFlag(["SIGUSR2"]).restore()
        assert calls == []
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _train_with_a_requeue_handler(overrides: list[str], signal_at: int):
    """Train with a SIGUSR2 handler installed first, as submitit does, and signal rank 0."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer import checkpoint as ckpt
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    rank = int(os.environ["RANK"])
    run_dir = Path(cfg.run_dir)

    def requeue(signum, frame):
        # What submitit's handler would find when it requeues the job.
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        (run_dir / f"requeued_by_rank{rank}.json").write_text(
            json.dumps({"signal": signal.Signals(signum).name, "checkpoint": latest.name})
        )
        if rank == 0:
            raise SystemExit(-1)  # submitit exits the main task after `scontrol requeue`

    signal.signal(signal.SIGUSR2, requeue)
    trainer = Trainer(cfg, resolved)
    train_step = trainer._train_step

    def signalled_step(batches, flag):
        if trainer.global_step == signal_at and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR2)  # reaches rank 0 only
        return train_step(batches, flag)

    trainer._train_step = signalled_step
    try:
        trainer.run()
        outcome = ("finished", 0)
    except SystemExit as stop:
        outcome = ("exit", stop.code)
    step = trainer.global_step
    dist.destroy_process_group()
    return (*outcome, step)


@pytest.mark.slow
def test_sigusr2_saves_exits_with_the_requeue_code_then_lets_submitit_requeue(tmp_path):
    import json

    from data_pipelines.testing import build_sample_shards
    from omni_train.testing import run_ranks
    from omni_train.trainer import checkpoint as ckpt

    data = build_sample_shards(tmp_path / "corpus", num_clips=2, seed=0)
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data / 'shards' / '*.tar'}",
        "trainer.max_steps=6",
        "trainer.save_every=100",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
    ]
    results = run_ranks(_train_with_a_requeue_handler, 2, overrides, 1)
    # Every rank stops after step 2; rank 1 exits with the requeue code, rank 0 is ended by
    # the handler that owned SIGUSR2 before training.
    assert results == [("exit", -1, 2), ("exit", 143, 2)]
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step_00000002" and ckpt.read_meta(latest)["reason"] == "preempted"
    marker = json.loads((run_dir / "preempted.json").read_text())
    timings = {k: marker.pop(k) for k in ("save_seconds", "seconds_since_signal")}
    assert marker == {"step": 2, "signal": "SIGUSR2", "exit_code": 143}
    assert 0 < timings["save_seconds"] <= timings["seconds_since_signal"] < 30
    # Only the signalled rank passes the signal on, once the checkpoint is on disk.
    handled = json.loads((run_dir / "requeued_by_rank0.json").read_text())
    assert handled == {"signal": "SIGUSR2", "checkpoint": "step_00000002"}
    assert not (run_dir / "requeued_by_rank1.json").exists()
