"""launch/slurm/train.sbatch on a real slurm, 2 CPU ranks: the time-limit warning (SIGUSR1),
`scancel --signal=TERM` and `scontrol requeue` each stop the job with a checkpoint, the job
is requeued and resumes, and the losses of the finished run equal an uninterrupted run's.

Slurm signals every process of the job step (W&B's service, loader workers and torchrun
included), which is what these tests exercise and the in-process signal tests cannot.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from data_pipelines.testing import build_sample_shards

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# 0.06-0.1 s a step: the time-limit warning (slurm checks every ~30 s) must come while the
# first job still trains, and three more jobs need steps left after it.
MAX_STEPS = 600
KILL_WAIT_S = 30  # slurm.conf KillWait: SIGKILL follows a SIGTERM after this long


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=2)
    return str(data / "shards" / "*.tar")


def _overrides(shards: str) -> list[str]:
    return [
        "experiment=smoke",
        f"data.shards={shards}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=1000",
        "trainer.progress_bar=false",
        "logger.console_every=50",
        "data.resolution=[32,32]",
        "data.num_frames=9",
        "data.num_workers=1",  # a loader worker process, which must outlive the signals too
    ]


def _submit(slurm, run_dir: Path, shards: str, log: Path) -> str:
    env = slurm.job_env(RUN_DIR=str(run_dir), NPROC_PER_NODE="2")
    args = ["--nodes=1", "--cpus-per-task=2", "--time=10", f"--output={log}"]
    return slurm.sbatch([*args, "launch/slurm/train.sbatch", *_overrides(shards)], env)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a row being written
    return rows


def _last_step(run_dir: Path) -> int:
    rows = _rows(run_dir)
    return rows[-1]["step"] if rows else 0


def _finished(slurm, job: str) -> bool:
    state = slurm.job_field(job, "JobState")
    assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), state
    return state == "COMPLETED"


def _requeued(slurm, job: str, restarts: int) -> bool:
    return (
        slurm.job_field(job, "JobState") == "PENDING"
        and int(slurm.job_field(job, "Restarts") or 0) >= restarts
    )


def _interrupt(
    slurm, job: str, run_dir: Path, log: Path, restarts: int, send, steps: int = 5
) -> dict:
    """Let the job train ``steps`` past its resume point, signal it with ``send``, wait for
    the requeue; the preemption marker the training left, with timings."""
    resumed_at = _last_step(run_dir)
    slurm.wait_for(
        lambda: (
            slurm.job_field(job, "JobState") == "RUNNING"
            and _last_step(run_dir) >= resumed_at + steps
        ),
        240,
        f"job {job} to train past step {resumed_at + steps}",
        log,
    )
    sent = time.time()
    send()
    slurm.wait_for(lambda: _requeued(slurm, job, restarts), 120, f"job {job} requeued", log)
    marker = json.loads((run_dir / "preempted.json").read_text())
    marker["requeued_after_s"] = time.time() - sent
    return marker


def test_time_limit_warning_sigterm_and_requeue_each_resume_with_identical_losses(
    slurm, shards, tmp_path
):
    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.out"
    job = _submit(slurm, reference_dir, shards, reference_log)
    slurm.wait_for(lambda: _finished(slurm, job), 300, "the uninterrupted run", reference_log)
    reference = _rows(reference_dir)
    assert [r["step"] for r in reference] == list(range(1, MAX_STEPS + 1))

    run_dir, log = tmp_path / "run", tmp_path / "run.out"
    job = _submit(slurm, run_dir, shards, log)
    markers = []

    # 1. The time limit comes near: slurm sends the --signal=USR1@300 warning by itself.
    def shorten_time_limit():
        slurm.scontrol("update", f"jobid={job}", "TimeLimit=5")

    # As soon as training runs: slurm may take ~30 s to send it.
    markers.append(_interrupt(slurm, job, run_dir, log, 1, shorten_time_limit, steps=1))
    slurm.scontrol("update", f"jobid={job}", "TimeLimit=10")
    slurm.release_requeued(job)

    # 2. scancel --signal=TERM: every process of the step gets SIGTERM, W&B's service too.
    def sigterm():
        subprocess.run(["scancel", "--signal=TERM", job], check=True)

    markers.append(_interrupt(slurm, job, run_dir, log, 2, sigterm))
    slurm.release_requeued(job)

    # 3. scontrol requeue: slurm ends the job with SIGTERM and requeues it by itself.
    markers.append(_interrupt(slurm, job, run_dir, log, 3, lambda: slurm.scontrol("requeue", job)))
    slurm.release_requeued(job)
    slurm.wait_for(lambda: _finished(slurm, job), 300, "the interrupted run to finish", log)

    assert [m["signal"] for m in markers] == ["SIGUSR1", "SIGTERM", "SIGTERM"], markers
    steps = [m["step"] for m in markers]
    assert 0 < steps[0] < steps[1] < steps[2] < MAX_STEPS, steps
    text = log.read_text(errors="replace")
    for marker in markers:
        assert marker["exit_code"] == 143
        assert marker["seconds_since_signal"] < KILL_WAIT_S, marker
        saved = f"stopping on {marker['signal']} after step {marker['step']}: saved "
        assert saved in text, marker
    # Each segment resumed from the checkpoint the previous one saved.
    resumed = list(dict.fromkeys(line for line in text.splitlines() if "resumed from" in line))
    assert [f"step_{s:08d} (step {s})" in r for r, s in zip(resumed, steps, strict=True)] == [
        True
    ] * 3, resumed
    # W&B's service died of the step-wide SIGTERM twice; the trainer carried on without it.
    assert text.count("W&B service lost") >= 2
    print(
        "\n".join(
            f"{m['signal']}: saved in {m['save_seconds']:.2f} s, "
            f"{m['seconds_since_signal']:.2f} s after the signal; requeued "
            f"{m['requeued_after_s']:.1f} s after it was sent"
            for m in markers
        )
    )

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    for got, want in zip(rows, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), got["step"]
        assert got["active_audio"] == want["active_audio"], got["step"]
