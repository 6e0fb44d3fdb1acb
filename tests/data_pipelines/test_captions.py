from __future__ import annotations

import json
import shutil

import pytest

from data_pipelines.captions import load_captions
from data_pipelines.config import ShardConfig
from data_pipelines.pipeline import run_shard
from data_pipelines.progress import SettingsMismatch
from data_pipelines.testing import shard_members


def test_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"path": "x/one.mp4", "caption": "a man  talks"}\n\n'
        + json.dumps({"video": str(tmp_path / "two.mkv"), "text": "waves"})
        + "\n"
    )
    assert load_captions(tmp_path / "a.jsonl", tmp_path) == {
        "x/one.mp4": "a man talks", "two.mkv": "waves",
    }  # fmt: skip
    (tmp_path / "b.csv").write_text('path,caption\none.mp4,"hello, world"\n')
    assert load_captions(tmp_path / "b.csv", tmp_path) == {"one.mp4": "hello, world"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"path": "a.mp4"}\n', r"bad.jsonl:1: no caption column"),
        ("bad.jsonl", "not json\n", r"bad.jsonl:1: not valid JSON"),
        ("bad.csv", "file_name,caption\na.mp4,x\n", r"bad.csv:2: no path column"),
        ("bad.txt", "a.mp4 x\n", r"expected a .jsonl or .csv file"),
    ],
)
def test_bad_manifests_name_the_line_and_the_fix(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_captions(tmp_path / name, tmp_path)


def test_manifest_captions_win_over_sidecars(sample, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(sample.corpus, corpus)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(
        '{"path": "clip03_closeup.mp4", "caption": "a face speaks"}\n'
        '{"path": "clip00_wave.mp4", "caption": "someone waves hello"}\n'
    )
    out = tmp_path / "out"
    run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(out), captions=str(manifest)))
    metas = [json.loads(m["json"]) for m in shard_members(out).values()]
    by_source = {m["source"]: m for m in metas}
    closeup = by_source["clip03_closeup.mp4"]  # no sidecar: text was weak without the manifest
    assert closeup["caption"] == "a face speaks" and closeup["quality"]["text"] == "strong"
    assert closeup["quality"]["methods"]["caption"] == "manifest"
    assert by_source["clip00_wave.mp4"]["caption"] == "someone waves hello"
    walk = by_source["clip01_walk.mp4"]
    assert walk["quality"]["methods"]["caption"] == "sidecar" and walk["caption"]
    manifest.write_text('{"path": "clip00_wave.mp4", "caption": "changed"}\n')
    with pytest.raises(SettingsMismatch, match="captions_sha1"):
        run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(out), captions=str(manifest)))
