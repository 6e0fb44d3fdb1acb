from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from data_pipelines.config import ShardConfig
from data_pipelines.merge import run_merge
from data_pipelines.pipeline import partition_of, run_shard, scan_inputs
from data_pipelines.testing import read_jsonl, shard_members

REPO_ROOT = Path(__file__).resolve().parents[2]


def _part(sample, out, partition: int, total: int = 2) -> dict:
    return run_shard(
        ShardConfig(
            input_dir=str(sample.corpus), output_dir=str(out),
            num_partitions=total, partition=partition,
        )
    )  # fmt: skip


def test_partitions_split_the_inputs_and_merge_into_one_job(sample, tmp_path):
    out = tmp_path / "data"
    inputs = scan_inputs(sample.corpus)
    assert {partition_of(s, 2) for s in inputs} == {0, 1}  # both partitions get work
    _part(sample, out, 1)
    with pytest.raises(ValueError, match=r"missing \[0\]"):
        run_merge(out)
    _part(sample, out, 0)
    stats = run_merge(out)

    manifest = read_jsonl(out / "manifest.jsonl")
    single = read_jsonl(sample.data / "manifest.jsonl")
    strip = lambda rows: sorted((r["key"], json.dumps(r["quality"])) for r in rows)  # noqa: E731
    assert strip(manifest) == strip(single)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert {r["source"] for r in manifest} | {r["source"] for r in rejects} == set(inputs)
    single_stats = json.loads((sample.data / "stats.json").read_text())
    for key in ("inputs", "inputs_sharded", "inputs_rejected", "clips", "sharded", "quality"):
        assert stats[key] == single_stats[key], key
    assert json.loads((out / "stats.json").read_text()) == stats
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(shards) == stats["shards"]
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert keys == [row["key"] for row in manifest]
    for row in manifest:
        assert (out / row["shard"]).is_file()
    # same sample bytes as the single job, whatever the partitioning
    assert shard_members(out) == shard_members(sample.data)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run_merge(out) == stats
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_bad_partition_settings_are_refused(sample, tmp_path):
    with pytest.raises(ValueError, match="0 <= partition < num_partitions"):
        _part(sample, tmp_path / "out", 2, total=2)
    with pytest.raises(ValueError, match="no parts/part_P-of-N"):
        run_merge(tmp_path)


@pytest.mark.slow
def test_slurm_array_script_and_merge_cli(sample, tmp_path):
    script = REPO_ROOT / "launch" / "slurm" / "shard.sbatch"
    out = tmp_path / "out"
    for task in ("0", "1"):
        env = {**os.environ, "NUM_PARTITIONS": "2", "SLURM_ARRAY_TASK_ID": task,
               "SLURM_CPUS_PER_TASK": "1", "PY": sys.executable}  # fmt: skip
        done = subprocess.run(
            ["bash", str(script), str(sample.corpus), str(out), "annotators=light"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "python -m data_pipelines.merge" in done.stdout
    merged = subprocess.run(
        [sys.executable, "-m", "data_pipelines.merge", f"output_dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "condition" in merged.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == len(scan_inputs(sample.corpus))
    unset = subprocess.run(["bash", str(script), "a", "b"], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"]})  # fmt: skip
    assert unset.returncode != 0 and "array job" in unset.stderr
    dry = subprocess.run(
        ["bash", str(script), "fps=25"], capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "INPUT_DIR": "/in", "OUTPUT_DIR": "/out",
             "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"},
    )  # fmt: skip
    assert dry.returncode == 0 and "/out/parts/part_0002-of-0003" in dry.stdout
    assert "num_partitions=3 partition=2" in dry.stdout and "fps=25" in dry.stdout
