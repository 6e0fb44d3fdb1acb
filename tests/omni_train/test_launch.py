"""The real command line: launch/torchrun.sh on 2 ranks (ZeRO-3), resume, then sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from data_pipelines.testing import build_sample_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(
    args: list[str], timeout: float = 300, dry: bool = False, extra: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PY=sys.executable, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    env.update(extra or {})
    if dry:
        env["DRY_RUN"] = "1"
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_trains_resumes_and_samples(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=4, seed=1)
    run_dir = tmp_path / "run"
    common = [
        "bash",
        "launch/torchrun.sh",
        "2",
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.save_every=2",
        "trainer.zero_stage=3",
        "logger.wandb.enabled=false",
    ]
    _run([*common, "trainer.max_steps=2"])
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000002"]
    _run([*common, "trainer.max_steps=4"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3

    out = tmp_path / "sample.mp4"
    clip = next(
        p for p in sorted((tmp_path / "corpus" / "corpus").glob("*.mp4")) if "broken" not in p.name
    )
    _run(
        [
            sys.executable,
            "-m",
            "omni_train.sample",
            f"checkpoint={run_dir}",
            f"ref_image={clip}",
            f"audio={clip}",
            f"out={out}",
            "sampling_steps=1",
        ]
    )
    with av.open(str(out)) as container:
        assert container.streams.audio and container.streams.video
        assert sum(1 for _ in container.decode(video=0)) >= 29


def _node(rank: int, port: int, args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PY=sys.executable,
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NNODES="2",
        NODE_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RDZV_ID=f"test-{port}",
        SKIP_CHECK="1",
    )
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller via proc.wait
    # A session per node: the test signals a whole node like slurm signals a job step.
    return subprocess.Popen(
        ["bash", "launch/torchrun.sh", "1", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _descendants(pid: int) -> list[int]:
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in table.stdout.splitlines():
        child, parent = (int(v) for v in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


def test_two_nodes_on_localhost_stop_on_sigusr1_save_and_resume(tmp_path):
    import signal
    import time

    from omni_train.testing import free_port

    data = build_sample_shards(tmp_path / "corpus", num_clips=4, seed=4)
    run_dir = tmp_path / "run"
    common = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.save_every=100",
        "logger.wandb.enabled=false",
    ]
    port = free_port()
    nodes = [
        _node(r, port, [*common, "trainer.max_steps=60"], tmp_path / f"n{r}.log") for r in (0, 1)
    ]
    deadline = time.monotonic() + 240
    while not _metric_steps(run_dir):
        assert time.monotonic() < deadline, (tmp_path / "n0.log").read_text()[-3000:]
        assert all(n.poll() is None for n in nodes), (tmp_path / "n0.log").read_text()[-3000:]
        time.sleep(0.2)
    # As slurm's --signal=USR1@T does: every process of the job step (torchrun starts its
    # workers in sessions of their own, so a process-group signal would miss them).
    for node in nodes:
        for pid in [node.pid, *_descendants(node.pid)]:
            os.kill(pid, signal.SIGUSR1)
    codes = [node.wait(timeout=120) for node in nodes]
    logs = "".join((tmp_path / f"n{r}.log").read_text() for r in (0, 1))
    assert all(code != 0 for code in codes), logs[-3000:]  # torchrun reports the stop as failed
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["exit_code"] == 143 and marker["signal"] == "SIGUSR1"
    stopped = marker["step"]
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "complete.json").is_file()

    port = free_port()
    final = stopped + 2
    nodes = [
        _node(r, port, [*common, f"trainer.max_steps={final}"], tmp_path / f"r{r}.log")
        for r in (0, 1)
    ]
    codes = [node.wait(timeout=240) for node in nodes]
    assert codes == [0, 0], (tmp_path / "r0.log").read_text()[-3000:]
    assert _metric_steps(run_dir) == list(range(1, final + 1))
    assert not (run_dir / "preempted.json").exists()
    meta = json.loads((run_dir / "checkpoints" / f"step_{final:08d}" / "complete.json").read_text())
    assert meta["world_size"] == 2


def test_dry_runs_print_the_commands_and_run_nothing(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=2, seed=5)
    args = ["experiment=smoke", f"data.shards={data}/shards/*.tar"]
    proc = _run(["bash", "launch/torchrun.sh", "2", f"run_dir={tmp_path / 'run'}", *args], dry=True)
    assert "would run:" in proc.stdout and "--nproc_per_node 2" in proc.stdout
    assert "experiment: smoke" in proc.stdout
    env_extra = {"RUN_DIR": str(tmp_path / "run"), "SLURM_NNODES": "2", "NPROC_PER_NODE": "4"}
    proc = _run(["bash", "launch/slurm/train.sbatch", *args], dry=True, extra=env_extra)
    assert "would run: srun" in proc.stdout and "launch/torchrun.sh 4" in proc.stdout
    assert not (tmp_path / "run").exists()
    extra = {
        "INPUT_DIR": str(tmp_path / "corpus" / "corpus"),
        "OUTPUT_DIR": str(tmp_path / "parts"),
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    proc = _run(["bash", "launch/slurm/shard.sbatch"], dry=True, extra=extra)
    assert "num_partitions=3 partition=1" in proc.stdout
    assert not (tmp_path / "parts").exists()
