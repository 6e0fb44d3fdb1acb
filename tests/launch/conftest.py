"""A real slurm for the launcher tests.

Tests marked ``slurm`` submit jobs to the slurm that `sbatch` answers to. Where none answers,
the one-node cluster of ../shared/tools/local-slurm.sh is started (root; Debian packages);
only where that cannot be done either are the tests skipped, with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO.parent / "shared" / "tools" / "local-slurm.sh"


def _answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and any(
        s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in proc.stdout.split()
    )


def _start_local_slurm() -> str | None:
    """Start the local cluster; None when it is running, else why it is not."""
    if not LOCAL_SLURM.is_file():
        return f"no slurm answers and {LOCAL_SLURM} is absent"
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{LOCAL_SLURM} start failed: {proc.stderr.strip()[-500:]}"
    for line in proc.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            os.environ["SLURM_CONF"] = line.split("=", 1)[1].strip()
    return None if _answers() else "local slurm started but sinfo shows no usable node"


class Slurm:
    """The commands a test drives the cluster with (the `slurm` fixture)."""

    repo = REPO

    @staticmethod
    def job_env(**extra: str) -> dict[str, str]:
        """The environment a test job is submitted with (sbatch exports it to the job)."""
        env = dict(
            os.environ,
            PY=sys.executable,
            WANDB_MODE="offline",
            HF_HUB_OFFLINE="1",
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        env.pop("WANDB_SERVICE", None)
        env.update(extra)
        return env

    @staticmethod
    def sbatch(args: list[str], env: dict[str, str]) -> str:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    @staticmethod
    def scontrol(*args: str) -> str:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True)
        assert proc.returncode == 0, f"scontrol {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    @staticmethod
    def job_field(job_id: str, name: str) -> str:
        """One field of `scontrol show job` (e.g. JobState, Restarts), "" once slurm forgot it."""
        proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
        for token in proc.stdout.split():
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
        return ""

    @staticmethod
    def release_requeued(job_id: str) -> None:
        """Start a requeued job now instead of after slurm's hold (~2 minutes, BeginTime).

        The hold keeps a restart from meeting the credential slurmd revoked for the previous
        run of the same job id; revocation has one-second resolution, so a start a few
        seconds after the job is back to PENDING is safe.
        """
        time.sleep(3)
        if Slurm.job_field(job_id, "JobState") != "PENDING":
            return
        update = ["scontrol", "update", f"jobid={job_id}", "StartTime=now"]
        proc = subprocess.run(update, capture_output=True, text=True)
        # Slurm may have started it between the two calls: then there is nothing to release.
        if proc.returncode != 0 and "no longer pending" not in proc.stderr:
            raise AssertionError(f"{' '.join(update)}: {proc.stderr}")

    @staticmethod
    def wait_for(
        condition: Callable[[], object], timeout: float, what: str, log: Path | None = None
    ) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    if not _answers():
        reason = _start_local_slurm()
        if reason is not None:
            pytest.skip(f"slurm tests need a slurm cluster: {reason}")
    return Slurm()
