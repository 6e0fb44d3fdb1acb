"""A worker process that dies (here: a segfault on one chosen source) does not stop the job.

The crash is injected without any hook in the production code: the test replaces
``pipeline.process_source`` (the function the pool submits, looked up at submission time)
with ``segfault_on_culprit`` below. Spawned workers unpickle it by its qualified name, so it is
a module-level function of this module, which the workers import.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from data_pipelines import pipeline, samples
from data_pipelines.config import ShardConfig
from data_pipelines.testing import read_jsonl, shard_members

CULPRIT = "clip01_walk.mp4"


def segfault_on_culprit(path, source, cfg, caption=None, spool=False):
    if source == CULPRIT:
        os.kill(os.getpid(), signal.SIGSEGV)
    return samples.process_source(path, source, cfg, caption, spool)


def _shard(corpus: Path, out: Path, workers: int) -> dict:
    return pipeline.run_shard(
        ShardConfig(input_dir=str(corpus), output_dir=str(out), workers=workers, progress=False)
    )


def test_a_segfaulting_worker_becomes_a_reject_and_the_rest_is_unchanged(
    sample, tmp_path, monkeypatch
):
    without = tmp_path / "without_culprit"
    shutil.copytree(sample.corpus, without)
    (without / CULPRIT).unlink()
    reference = tmp_path / "reference"
    _shard(without, reference, workers=1)

    monkeypatch.setattr(pipeline, "process_source", segfault_on_culprit)
    out = tmp_path / "crashed"
    stats = _shard(sample.corpus, out, workers=2)

    rejects = read_jsonl(out / "rejects.jsonl")
    crashed = [row for row in rejects if row["reason"] == "worker_crashed"]
    assert crashed == [
        {
            "source": CULPRIT,
            "reason": "worker_crashed",
            "detail": "the worker process died on this input (signal SIGSEGV); "
            "the job went on without it",
        }
    ]
    assert [row for row in rejects if row["source"] != CULPRIT] == read_jsonl(
        reference / "rejects.jsonl"
    )
    # Every other source is sharded exactly as by a run that never saw the culprit.
    assert shard_members(out) == shard_members(reference)
    for name in ("manifest.jsonl",):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    shards = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert shards == sorted(p.name for p in (reference / "shards").glob("*.tar"))
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes()
    assert stats["rejected"]["by_reason"]["worker_crashed"] == 1
    assert stats["sharded"] == len(read_jsonl(reference / "manifest.jsonl"))
    assert not (out / "status.json").exists()  # a finished run leaves no live status


def test_crash_details_name_the_signal_or_exit_code():
    by_signal = pipeline.crashed_result("a.mp4", -int(signal.SIGKILL))
    assert by_signal.rejects[0]["detail"].startswith(
        "the worker process died on this input (signal SIGKILL)"
    )
    by_exit = pipeline.crashed_result("a.mp4", 3)
    assert "(exit code 3)" in by_exit.rejects[0]["detail"]
    assert by_exit.samples == []
