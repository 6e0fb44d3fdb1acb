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


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PY=sys.executable, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
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
