from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipelines import pipeline
from data_pipelines.config import ShardConfig
from data_pipelines.progress import SettingsMismatch
from data_pipelines.testing import read_jsonl


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _contents(folder: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _) in _snapshot(folder).items()}


def _copy(sample, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(sample.data, out)
    return out


def _shard(sample, out: Path, **overrides) -> dict:
    return pipeline.run_shard(
        ShardConfig(input_dir=str(sample.corpus), output_dir=str(out), **overrides)
    )


def test_rerun_after_completion_rewrites_nothing(sample, tmp_path):
    out = _copy(sample, tmp_path)
    before = _snapshot(out)
    _shard(sample, out)
    assert _snapshot(out) == before  # same bytes and same mtimes


def test_deleted_shard_is_rebuilt_identically(sample, tmp_path):
    out = _copy(sample, tmp_path)
    reference = _contents(sample.data)
    (out / "shards" / "shard-000000.tar").unlink()
    kept_mtime = (out / "shards" / "shard-000001.tar").stat().st_mtime_ns
    _shard(sample, out)
    assert _contents(out) == reference
    assert (out / "shards" / "shard-000001.tar").stat().st_mtime_ns == kept_mtime


def test_crash_leftovers_are_replaced(sample, tmp_path):
    out = _copy(sample, tmp_path)
    reference = _contents(sample.data)
    # As if the job died while writing the last shard: a partial .tmp, no record, no tar.
    last = out / "shards" / "shard-000001.tar"
    last.with_name(last.name + ".tmp").write_bytes(last.read_bytes()[:3000])
    last.unlink()
    (out / "progress" / "shard-000001.json").unlink()
    _shard(sample, out)
    assert _contents(out) == reference


def test_interrupted_run_resumes_to_the_same_outputs(sample, tmp_path, monkeypatch):
    out = tmp_path / "data"
    calls = {"n": 0}
    real = pipeline.process_source

    def dies_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "process_source", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        _shard(sample, out)
    assert not list((out / "shards").glob("*.tmp"))
    monkeypatch.setattr(pipeline, "process_source", real)
    _shard(sample, out)
    assert _contents(out) == _contents(sample.data)
    keys = [row["key"] for row in read_jsonl(out / "manifest.jsonl")]
    assert len(keys) == len(set(keys))


def test_a_changed_source_is_resharded(sample, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(sample.corpus, corpus)
    out = tmp_path / "data"
    pipeline.run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(out)))
    shutil.copy(corpus / "clip02_still.mp4", corpus / "clip00_wave.mp4")
    pipeline.run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(out)))
    manifest = read_jsonl(out / "manifest.jsonl")
    keys = [row["key"] for row in manifest]
    assert len(keys) == len(set(keys)) == len(read_jsonl(sample.data / "manifest.jsonl"))
    wave = next(row for row in manifest if row["source"] == "clip00_wave.mp4")
    assert wave["end"] == 21 / 8  # it now holds the 2.6 s still clip (was 3.2 s)


def test_other_settings_on_the_same_output_are_refused(sample, tmp_path):
    out = _copy(sample, tmp_path)
    with pytest.raises(SettingsMismatch, match="fps: 8.0 -> 12.0"):
        _shard(sample, out, fps=12.0)


def test_parallel_workers_and_decoder_threads_write_the_same_bytes(sample, tmp_path):
    out = tmp_path / "data"
    stats = _shard(sample, out, workers=2, decode_threads=0)
    assert _contents(out) == _contents(sample.data)
    assert stats == json.loads((sample.data / "stats.json").read_text())
