from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines import pipeline, progress
from data_pipelines.config import ShardConfig
from data_pipelines.part_states import array_list, format_seconds, inspect_parts
from data_pipelines.pipeline import part_dir
from data_pipelines.status import show_status
from data_pipelines.testing import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rows(table: str) -> dict[str, list[str]]:
    """The table's rows by their first column, split on whitespace."""
    return {line.split()[0]: line.split() for line in table.splitlines()[1:]}


def _status(updated: float, state: str = "running") -> dict:
    return {
        "sources_total": 3, "sources_done": 1, "clips": 2, "clips_per_second": 0.5,
        "eta_seconds": 8.0, "rejects": 1, "failures": 1, "failed_sources": ["clip00_wave.mp4"],
        "started": updated - 10, "updated": updated, "host": "node7", "pid": 4242,
        "state": state,
    }  # fmt: skip


def test_partitioned_run_with_a_running_then_stale_part(sample, tmp_path):
    out = tmp_path / "data"
    pipeline.run_shard(
        ShardConfig(input_dir=str(sample.corpus), output_dir=str(out), num_partitions=2,
                    partition=0, progress=False)
    )  # fmt: skip
    finished = json.loads((part_dir(out, 0, 2) / "stats.json").read_text())
    inputs, clips = finished["inputs"], finished["sharded"]
    # The plan gives part 0 clip01_walk (5.0 s, 2 clips) and clip02_still (2.6 s, 1 clip).
    assert (inputs, clips) == (2, 3)
    running = part_dir(out, 1, 2)
    running.mkdir(parents=True)
    (running / "status.json").write_text(json.dumps(_status(time.time())))

    rows = _rows(show_status(out, stale_after_seconds=600))
    assert rows["part_0000-of-0002"] == ["part_0000-of-0002", "finished", "2/2", "100.0", "3",
                                         "-", "-", "0"]  # fmt: skip
    assert rows["part_0001-of-0002"][:8] == ["part_0001-of-0002", "running", "1/3", "33.3", "2",
                                             "0.50", "8s", "1"]  # fmt: skip
    assert rows["part_0001-of-0002"][8:10] == ["node7:4242,", "updated"]
    assert rows["total"] == ["total", "1/2", "done", "3/5", "60.0", "5", "0.50", "8s", "1"]
    assert "to resubmit" not in show_status(out)  # a running part is not resubmitted

    # Its task died without a word: no update for an hour.
    (running / "status.json").write_text(json.dumps(_status(time.time() - 3600)))
    table = show_status(out, stale_after_seconds=600)
    stale = _rows(table)["part_0001-of-0002"]
    assert stale[1:8] == ["stale", "1/3", "33.3", "2", "0.50", "-", "1"]
    assert "updated 1h00m ago" in " ".join(stale)
    assert table.splitlines()[-1] == "to resubmit: sbatch --array=1 ... (NUM_PARTITIONS set)"
    # Stale exactly when older than the limit.
    (running / "status.json").write_text(json.dumps(_status(time.time() - 900)))
    assert _rows(show_status(out, stale_after_seconds=800))["part_0001-of-0002"][1] == "stale"
    assert _rows(show_status(out, stale_after_seconds=1000))["part_0001-of-0002"][1] == "running"
    (running / "status.json").write_text(json.dumps(_status(time.time() - 3600)))

    cli = subprocess.run(
        [sys.executable, "-m", "data_pipelines.status", f"output_dir={out}",
         "stale_after_seconds=600"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert _rows(cli.stdout)["part_0001-of-0002"][1] == "stale"
    assert "--array=1" in cli.stdout


def test_single_run_status(sample):
    rows = _rows(show_status(sample.data))
    stats = json.loads((sample.data / "stats.json").read_text())
    assert rows["."] == [".", "finished", "5/5", "100.0", str(stats["sharded"]), "-", "-", "0"]
    assert rows["total"][:5] == ["total", "1/1", "done", "5/5", "100.0"]


def test_live_status_while_running_after_an_interrupt_and_when_done(sample, tmp_path, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setattr(progress, "STATUS_EVERY_SECONDS", 0.0)  # write after every source
    real, seen = pipeline.process_source, []

    def snapshot_then_process(path, source, cfg, caption=None, spool=False):
        seen.append(json.loads((out / "status.json").read_text()))
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(path, source, cfg, caption, spool)

    monkeypatch.setattr(pipeline, "process_source", snapshot_then_process)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_shard(ShardConfig(input_dir=str(sample.corpus), output_dir=str(out)))
    # Sources in order: broken.mp4 (rejected), clip00_wave (1 clip), clip01_walk (2 clips).
    assert [s["sources_done"] for s in seen] == [0, 1, 2, 3]
    assert [s["clips"] for s in seen] == [0, 0, 1, 3]
    assert [s["rejects"] for s in seen] == [0, 1, 1, 1]
    assert {(s["sources_total"], s["state"], s["pid"], s["host"]) for s in seen} == {
        (5, "running", os.getpid(), socket.gethostname())
    }
    assert seen[0]["eta_seconds"] is None and seen[3]["eta_seconds"] is not None
    assert seen[3]["clips_per_second"] > 0
    left = json.loads((out / "status.json").read_text())
    assert left["state"] == "stopped: KeyboardInterrupt" and left["sources_done"] == 3
    (state,) = inspect_parts(out)
    assert (state.state, state.done, state.total, state.eta_seconds) == ("stopped", 3, 5, None)
    assert "(stopped: KeyboardInterrupt)" in state.detail

    monkeypatch.setattr(pipeline, "process_source", real)
    pipeline.run_shard(ShardConfig(input_dir=str(sample.corpus), output_dir=str(out)))
    assert not (out / "status.json").exists()
    (state,) = inspect_parts(out)
    assert (state.state, state.done, state.total) == ("finished", 5, 5)
    assert len(read_jsonl(out / "manifest.jsonl")) == state.clips


def test_helpers_and_bad_output_dir(tmp_path):
    assert array_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert [format_seconds(s) for s in (None, 7, 61, 3725)] == ["-", "7s", "1m01s", "1h02m"]
    with pytest.raises(ValueError, match="is not an existing folder"):
        show_status(tmp_path / "nothing")
    assert "no shard run has started" in show_status(tmp_path)


def test_live_status_counts_failures_apart_from_bad_inputs(tmp_path):
    live = progress.LiveStatus(tmp_path, total=5, done=1, every=0.0)
    live.source_done("a.mp4", 2, [])
    live.source_done("b.mp4", 0, [{"source": "b.mp4", "reason": "worker_crashed"}])
    live.source_done("c.mp4", 0, [{"source": "c.mp4", "reason": "decode_error"}])
    status = progress.read_status(tmp_path)
    assert (status.sources_done, status.clips, status.rejects) == (4, 2, 2)
    assert (status.failures, status.failed_sources) == (1, ["b.mp4"])
    # One source left at the pace of this run's three: a third of the time so far.
    elapsed = status.updated - status.started
    assert status.eta_seconds == pytest.approx(elapsed / 3, abs=0.05)
    assert status.clips_per_second == pytest.approx(2 / elapsed, rel=0.01)
    live.source_done("d.mp4", 1, [])
    assert progress.read_status(tmp_path).eta_seconds == 0
    live.finished()
    assert progress.read_status(tmp_path) is None
