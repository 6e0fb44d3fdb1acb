from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import webdataset as wds

from data_pipelines import samples
from data_pipelines.config import ShardConfig
from data_pipelines.media import encode_mp4
from data_pipelines.merge import run_merge
from data_pipelines.part_states import inspect_parts
from data_pipelines.pipeline import part_dir, run_shard, scan_inputs
from data_pipelines.testing import read_jsonl, shard_members
from data_pipelines.workload import (
    _publish,
    measure_sources,
    new_plan,
    plan_for,
    plan_path,
    read_plan,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _hashed_partition(source: str, num_partitions: int) -> int:
    """The partition a path hash would give (equal counts, not equal work): the baseline."""
    return int(hashlib.sha1(source.encode("utf-8")).hexdigest()[:8], 16) % num_partitions


def _part(sample, out, partition: int, total: int = 2, corpus: Path | None = None) -> dict:
    return run_shard(
        ShardConfig(
            input_dir=str(corpus or sample.corpus), output_dir=str(out),
            num_partitions=total, partition=partition, progress=False,
        )
    )  # fmt: skip


def test_partitions_split_the_inputs_and_merge_into_one_job(sample, tmp_path):
    out = tmp_path / "data"
    inputs = scan_inputs(sample.corpus)
    _part(sample, out, 1)
    plan = read_plan(out / "parts", 2)
    assert set(plan.assignment) == set(inputs)
    assert set(plan.assignment.values()) == {0, 1}  # both partitions get work
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


def _moving_square(seconds: float, fps: int = 25) -> bytes:
    """A video with a bright square sliding over a gradient: no cuts, enough contrast."""
    y, x = np.mgrid[0:64, 0:96]
    background = ((2 * x + y) % 256).astype(np.uint8)
    frames = np.empty((round(seconds * fps), 64, 96, 3), np.uint8)
    for i, frame in enumerate(frames):
        frame[..., 0], frame[..., 1], frame[..., 2] = background, 255 - background, 128
        left = (2 * i) % 80
        frame[20:40, left : left + 16] = 255
    return encode_mp4(frames, fps)


@pytest.fixture(scope="module")
def skewed(sample, tmp_path_factory) -> SimpleNamespace:
    """The sample corpus (3.2, 5.0, 2.6 and 3.6 s clips, broken.mp4) plus one 8 s source,
    and a single-job run over it."""
    root = tmp_path_factory.mktemp("skewed")
    corpus = root / "corpus"
    shutil.copytree(sample.corpus, corpus)
    (corpus / "keynote.mp4").write_bytes(_moving_square(8.0))
    single = root / "single"
    run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(single), progress=False))
    return SimpleNamespace(corpus=corpus, single=single)


# keynote 8.0 s, walk 5.0, closeup 3.6, wave 3.2, still 2.6, broken.mp4 (no duration: its
# 5120 bytes at the corpus's 13173.6 bytes/s are 0.389 s). Longest first, each to the
# lighter partition: 8.0 -> 0, 5.0 -> 1, 3.6 -> 1, 3.2 -> 0, 2.6 -> 1, 0.389 -> 0.
BALANCED = {
    "keynote.mp4": 0, "clip01_walk.mp4": 1, "clip03_closeup.mp4": 1,
    "clip00_wave.mp4": 0, "clip02_still.mp4": 1, "broken.mp4": 0,
}  # fmt: skip
# The stated bound: on this corpus the heaviest partition is within 5% of the mean.
BALANCE_BOUND = 1.05


def test_plan_balances_work_where_hashing_did_not(skewed, tmp_path):
    sources = scan_inputs(skewed.corpus)
    sizes = measure_sources(skewed.corpus, sources)
    plan = new_plan(sizes, 2)
    assert plan.unit == "seconds"
    assert plan.work["broken.mp4"] == 0.389
    assert plan.assignment == BALANCED
    assert plan.expected_work() == pytest.approx([11.589, 11.2])
    mean = sum(plan.work.values()) / 2
    assert max(plan.expected_work()) <= BALANCE_BOUND * mean
    hashed = [0.0, 0.0]
    for source in sources:
        hashed[_hashed_partition(source, 2)] += plan.work[source]
    assert hashed == pytest.approx([20.189, 2.6])  # hashing: 1.77 x the mean
    assert max(hashed) > 1.7 * mean
    # Any listing order gives the same plan.
    assert new_plan(dict(reversed(list(sizes.items()))), 2).assignment == BALANCED

    out = tmp_path / "out"
    for partition in (0, 1):
        _part(None, out, partition, corpus=skewed.corpus)
    on_disk = json.loads(plan_path(out / "parts", 2).read_text())
    assert on_disk["expected_work"] == [11.589, 11.2]
    assert {s: p for s, (p, _) in on_disk["sources"].items()} == BALANCED
    for partition in (0, 1):
        part = part_dir(out, partition, 2)
        seen = {r["source"] for r in read_jsonl(part / "manifest.jsonl")}
        seen |= {r["source"] for r in read_jsonl(part / "rejects.jsonl")}
        assert seen == {s for s, p in BALANCED.items() if p == partition}
    run_merge(out)
    assert shard_members(out) == shard_members(skewed.single)  # same bytes as one job
    strip = lambda rows: sorted((r["key"], json.dumps(r["quality"])) for r in rows)  # noqa: E731
    assert strip(read_jsonl(out / "manifest.jsonl")) == strip(
        read_jsonl(skewed.single / "manifest.jsonl")
    )


def _small_corpus(tmp_path: Path, sample) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("clip00_wave.mp4", "clip01_walk.mp4", "clip02_still.mp4", "clip03_closeup.mp4"):
        shutil.copy(sample.corpus / name, corpus / name)
    return corpus


def test_plan_is_kept_and_new_sources_go_to_the_lightest_partition(sample, tmp_path):
    corpus, parts = _small_corpus(tmp_path, sample), tmp_path / "out" / "parts"
    first = plan_for(parts, corpus, scan_inputs(corpus), 2)
    # 5.0 -> 0, 3.6 -> 1, 3.2 -> 1, 2.6 -> 0
    assert first.assignment == {
        "clip01_walk.mp4": 0, "clip03_closeup.mp4": 1, "clip00_wave.mp4": 1,
        "clip02_still.mp4": 0,
    }  # fmt: skip
    assert first.expected_work() == pytest.approx([7.6, 6.8])
    plan_bytes = plan_path(parts, 2).read_bytes()

    shutil.copy(sample.corpus / "clip00_wave.mp4", corpus / "aa_new.mp4")  # 3.2 s, sorts first
    shutil.copy(sample.corpus / "clip02_still.mp4", corpus / "zz_new.mp4")  # 2.6 s
    second = plan_for(parts, corpus, scan_inputs(corpus), 2)
    assert plan_path(parts, 2).read_bytes() == plan_bytes  # the first plan is never rewritten
    assert {s: second.assignment[s] for s in first.assignment} == first.assignment
    # New ones, longest first, onto the loads [7.6, 6.8]: 3.2 -> 1 (10.0), 2.6 -> 0 (10.2).
    assert second.assignment["aa_new.mp4"] == 1 and second.assignment["zz_new.mp4"] == 0
    assert second.generations == 2
    added = json.loads(plan_path(parts, 2, 1).read_text())
    assert sorted(added["sources"]) == ["aa_new.mp4", "zz_new.mp4"]
    assert added["expected_work"] == [10.2, 10.0]
    # A resubmitted task with the same listing changes nothing.
    assert plan_for(parts, corpus, scan_inputs(corpus), 2).assignment == second.assignment
    assert not plan_path(parts, 2, 2).exists()


def test_the_first_plan_on_disk_wins_over_a_concurrent_one(sample, tmp_path):
    corpus, parts = _small_corpus(tmp_path, sample), tmp_path / "out" / "parts"
    sources = scan_inputs(corpus)
    # Another task, which listed the folder before clip03 existed, published first.
    earlier = new_plan(measure_sources(corpus, sources[:3]), 2)
    assert _publish(plan_path(parts, 2), json.dumps(_plan_json(earlier)).encode())
    assert not _publish(plan_path(parts, 2), b"{}")  # a second first write loses ...
    assert json.loads(plan_path(parts, 2).read_text())["sources"]  # ... and changes nothing
    plan = plan_for(parts, corpus, sources, 2)
    # 5.0 -> 0, 3.2 -> 1, 2.6 -> 1 on disk; the late clip03 (3.6) onto the lighter of [5.0, 5.8]
    assert earlier.assignment == {"clip01_walk.mp4": 0, "clip00_wave.mp4": 1, "clip02_still.mp4": 1}
    assert {s: plan.assignment[s] for s in sources[:3]} == earlier.assignment
    assert plan.assignment["clip03_closeup.mp4"] == 0
    assert not list(parts.glob(".*.tmp"))


def _plan_json(plan) -> dict:
    return {
        "version": 1, "num_partitions": plan.num_partitions, "unit": plan.unit,
        "bytes_per_second": plan.bytes_per_second, "input_dir": "",
        "sources": {s: [p, plan.work[s]] for s, p in plan.assignment.items()},
    }  # fmt: skip


def test_merge_refuses_missing_and_unfinished_parts_naming_what_to_resubmit(sample, tmp_path):
    out = tmp_path / "data"
    _part(sample, out, 1)
    with pytest.raises(ValueError) as refused:
        run_merge(out)
    message = str(refused.value)
    assert "missing [0], unfinished []" in message
    assert "part_0000-of-0002: missing, not started" in message
    assert "--array=0 " in message and "NUM_PARTITIONS=2" in message
    assert "allow_partial=true" in message
    assert not (out / "manifest.jsonl").exists()

    # Part 0 started on a node that vanished: its status stopped being updated.
    stale = part_dir(out, 0, 2)
    stale.mkdir(parents=True)
    (stale / "status.json").write_text(json.dumps(_status(updated=time.time() - 3600)))
    with pytest.raises(ValueError) as refused:
        run_merge(out)
    message = str(refused.value)
    assert "missing [], unfinished [0]" in message
    assert "part_0000-of-0002: stale, node7:4242, updated 1h00m ago" in message
    assert "--array=0 " in message

    # allow_partial merges what is there: part 1 only.
    stats = run_merge(out, allow_partial=True)
    part1 = json.loads((part_dir(out, 1, 2) / "stats.json").read_text())
    assert stats == {**part1, "shard_bytes": stats["shard_bytes"]}
    assert (out / "manifest.jsonl").read_bytes() == _relinked(part_dir(out, 1, 2), 0)


def _relinked(part: Path, first_index: int) -> bytes:
    """The part's manifest with its shards renamed as a merge that starts at first_index."""
    rows = read_jsonl(part / "manifest.jsonl")
    names = sorted({r["shard"] for r in rows})
    rename = {n: f"shards/shard-{first_index + i:06d}.tar" for i, n in enumerate(names)}
    return "".join(json.dumps({**r, "shard": rename[r["shard"]]}) + "\n" for r in rows).encode()


def _status(updated: float, state: str = "running") -> dict:
    return {
        "sources_total": 3, "sources_done": 1, "clips": 2, "clips_per_second": 0.5,
        "eta_seconds": 8.0, "rejects": 0, "failures": 0, "failed_sources": [],
        "started": updated - 10, "updated": updated, "host": "node7", "pid": 4242,
        "state": state,
    }  # fmt: skip


def test_merge_names_partitions_with_failed_sources(sample, tmp_path, monkeypatch, caplog):
    real = samples._process

    def fails_on_walk(path, source, cfg, *rest):
        if source == "clip01_walk.mp4":
            raise RuntimeError("decoder bug")
        return real(path, source, cfg, *rest)

    monkeypatch.setattr(samples, "_process", fails_on_walk)
    out = tmp_path / "data"
    for partition in (0, 1):
        _part(sample, out, partition)
    failing = read_plan(out / "parts", 2).assignment["clip01_walk.mp4"]
    with caplog.at_level(logging.WARNING, logger="data_pipelines.merge"):
        stats = run_merge(out)
    assert stats["rejected"]["by_reason"]["internal_error"] == 1
    report = caplog.text
    assert f"part_{failing:04d}-of-0002: 1 failed: clip01_walk.mp4" in report
    assert f"--array={failing} " in report and "to retry them" in report
    states = inspect_parts(out)
    assert [s.failed_sources for s in states] == [
        ["clip01_walk.mp4"] if p == failing else [] for p in (0, 1)
    ]


def test_a_part_that_finished_before_sources_were_added_is_behind(sample, tmp_path):
    corpus, out = _small_corpus(tmp_path, sample), tmp_path / "out"
    for partition in (0, 1):
        _part(None, out, partition, corpus=corpus)
    shutil.copy(sample.corpus / "clip00_wave.mp4", corpus / "aa_new.mp4")  # 3.2 s -> part 1
    shutil.copy(sample.corpus / "clip02_still.mp4", corpus / "zz_new.mp4")  # 2.6 s -> part 0
    _part(None, out, 1, corpus=corpus)  # plans the new files, shards its own one
    with pytest.raises(ValueError) as refused:
        run_merge(out)
    message = str(refused.value)
    assert "missing [], unfinished [0]" in message
    assert "part_0000-of-0002: behind, 1 sources added to the plan since it finished" in message
    assert "--array=0 " in message
    _part(None, out, 0, corpus=corpus)
    stats = run_merge(out)
    assert stats["inputs"] == 6 and stats["inputs_sharded"] == 6
    assert [s.state for s in inspect_parts(out)] == ["finished", "finished"]
