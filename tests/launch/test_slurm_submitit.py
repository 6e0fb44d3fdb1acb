"""hydra/launcher=slurm_gpu sweeps on a real slurm: every point trains with its own settings,
and a point sent submitit's SIGUSR2 saves, is requeued by submitit, resumes and ends with the
losses of an identical point that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_pipelines.testing import build_sample_shards

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

MAX_STEPS = 30
# Points 0 and 1 train identically (only their run_dir differs); point 2 has its own lr.
LRS = (1e-3, 1e-3, 2e-3)
INTERRUPTED = 0
SWEEP_TIMEOUT = 480
DEAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Two one-rank points share the node: each must find its own rendezvous port by itself
# (omni_train/trainer/distributed.py derives it from the job id).
JOB_SETUP = ["export WANDB_MODE=offline HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1"]


def launcher_overrides() -> list[str]:
    """What the 2-CPU, GPU-less test node needs instead of slurm_gpu's 8-GPU defaults."""
    setup = ",".join(f"'{line}'" for line in JOB_SETUP)
    return [
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.partition=debug",
        # submitit counts every SIGUSR2 within min(80%, T - 10 min) of the start as a
        # time-out rather than a preemption; with T <= 10 min that is every signal.
        "hydra.launcher.timeout_min=15",
        f"hydra.launcher.setup=[{setup}]",
    ]


def sweep_command(shards: Path, tmp_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "omni_train.train", "-m", *launcher_overrides(),
        "experiment=smoke", f"data.shards={shards}/*.tar", f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=1000", "logger.wandb.enabled=false",
        f"run_dir={tmp_path}/runs/" + "${hydra:job.num}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "trainer.optimizer.lr=" + ",".join(str(lr) for lr in LRS),
    ]  # fmt: skip


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def array_job_id(sweep_dir: Path) -> str | None:
    """The sweep's array job id, from submitit's folder (.submitit/ARRAYID/)."""
    found = [p.name for p in (sweep_dir / ".submitit").glob("*") if p.name.isdigit()]
    return found[0] if found else None


def task_states(array_id: str) -> list[str]:
    shown = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True, text=True)
    return re.findall(r"JobState=(\S+)", shown.stdout)


def checkpoint_meta(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "complete.json").read_text())


def interrupt(slurm, job: str, run_dir: Path, output: Path) -> dict:
    """SIGUSR2 to the job's steps once it has trained a few steps, as slurm's --signal does;
    returns the preemption marker written before the requeue."""
    slurm.wait_for(lambda: len(metric_rows(run_dir)) >= 3, 300, f"{job} to train", log=output)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    slurm.wait_for(
        lambda: slurm.job_field(job, "JobState") in ("PENDING", "COMPLETED", *DEAD),
        120, f"{job} to stop after SIGUSR2", log=output,
    )  # fmt: skip
    assert slurm.job_field(job, "JobState") == "PENDING", slurm.scontrol("show", "job", job)
    # Read before the requeued job starts: the resumed run removes the marker.
    marker_path = run_dir / "preempted.json"
    assert marker_path.is_file(), "the trainer did not save before submitit requeued the job"
    return json.loads(marker_path.read_text())


def wait_for_sweep(
    slurm, proc: subprocess.Popen, sweep_dir: Path, requeued: str, output: Path
) -> None:
    """Until the sweep command returns, releasing the requeued job from slurm's hold; fails at
    once if a point's job died, which submitit (without sacct) would wait for forever."""

    def finished() -> bool:
        slurm.release_requeued(requeued)
        array_id = array_job_id(sweep_dir)
        dead = set(task_states(array_id)) & DEAD if array_id else set()
        assert not dead, f"a sweep job ended {dead}\n{output.read_text()[-4000:]}"
        return proc.poll() is not None

    slurm.wait_for(finished, SWEEP_TIMEOUT, "the sweep to finish", log=output)


def stop_sweep(proc: subprocess.Popen, sweep_dir: Path) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    array_id = array_job_id(sweep_dir)
    if array_id and set(task_states(array_id)) - DEAD - {"COMPLETED"}:
        subprocess.run(["scancel", array_id], check=False)


def test_sweep_points_train_and_a_signalled_point_is_requeued_and_resumes(slurm, tmp_path):
    shards = build_sample_shards(tmp_path / "corpus", num_clips=4, seed=0, progress=False)
    shards = shards / "shards"
    sweep_dir, runs, output = tmp_path / "multirun", tmp_path / "runs", tmp_path / "sweep.out"
    with output.open("w") as out:
        proc = subprocess.Popen(
            sweep_command(shards, tmp_path), cwd=slurm.repo, env=slurm.job_env(),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        slurm.wait_for(lambda: array_job_id(sweep_dir), 120, "the sweep's sbatch", log=output)
        job = f"{array_job_id(sweep_dir)}_{INTERRUPTED}"
        marker = interrupt(slurm, job, runs / str(INTERRUPTED), output)
        wait_for_sweep(slurm, proc, sweep_dir, job, output)
    finally:
        stop_sweep(proc, sweep_dir)
    text = output.read_text()
    assert proc.returncode == 0, text[-4000:]

    for num, lr in enumerate(LRS):
        run_dir = runs / str(num)
        assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, MAX_STEPS + 1)), num
        assert checkpoint_meta(run_dir, MAX_STEPS)["step"] == MAX_STEPS
        assert OmegaConf.load(run_dir / "config.yaml").trainer.optimizer.lr == lr, num
    # The schedule scales each point's own base lr.
    for base, other in zip(metric_rows(runs / "0"), metric_rows(runs / "2"), strict=True):
        assert other["lr"] == pytest.approx(base["lr"] * LRS[2] / LRS[0], rel=1e-6)

    interrupted = runs / str(INTERRUPTED)
    assert marker["signal"] == "SIGUSR2" and 3 <= marker["step"] < MAX_STEPS
    assert checkpoint_meta(interrupted, marker["step"])["reason"] == "preempted"
    assert int(slurm.job_field(job, "Restarts")) >= 1
    log = next((sweep_dir / ".submitit").glob(f"*_{INTERRUPTED}/*_{INTERRUPTED}_0_log.out"))
    assert f"(step {marker['step']})" in log.read_text(), "the requeued job did not resume"
    losses = [r["loss"] for r in metric_rows(interrupted)]
    assert losses == pytest.approx([r["loss"] for r in metric_rows(runs / "1")], rel=1e-5)
