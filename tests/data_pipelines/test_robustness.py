"""Inputs that break things: every one is sharded correctly or rejected with a reason, and
the job goes on; a run killed with SIGKILL resumes to the same bytes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipelines.config import ShardConfig
from data_pipelines.media import encode_mp4
from data_pipelines.pipeline import run_shard, scan_inputs
from data_pipelines.testing import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]


def _remux(payload: bytes, container: str, path: Path) -> None:
    with av.open(io.BytesIO(payload)) as source, av.open(str(path), "w", format=container) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in source.streams}
        for packet in source.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)


def _video_only_webm(path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (60, 64, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def test_truncated_tiny_and_video_only_inputs(sample, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    good = (sample.corpus / "clip00_wave.mp4").read_bytes()
    (inputs / "cut.mp4").write_bytes(good[: len(good) * 6 // 10])  # index (moov) is lost
    _remux(good, "matroska", inputs / "whole.mkv")
    whole = (inputs / "whole.mkv").read_bytes()
    (inputs / "cut.mkv").write_bytes(whole[: len(whole) * 6 // 10])  # decodes, but too little
    (inputs / "cut_late.mkv").write_bytes(whole[: len(whole) * 95 // 100])  # most of it left
    noise = np.random.default_rng(1).integers(0, 255, (75, 16, 16, 3), dtype=np.uint8)
    (inputs / "tiny.mp4").write_bytes(encode_mp4(noise, 25))  # 16 x 16 pixels, 3 s
    _video_only_webm(inputs / "sub" / "silent.webm")
    (inputs / "random.avi").write_bytes(np.random.default_rng(2).bytes(5000))
    stats = run_shard(ShardConfig(input_dir=str(inputs), output_dir=str(tmp_path / "out")))

    rejects = {r["source"]: r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    manifest = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert {r["source"] for r in manifest} | set(rejects) == set(scan_inputs(inputs))
    assert rejects["cut.mp4"]["reason"] == "unreadable"
    assert rejects["cut.mkv"]["reason"] == "too_short" and "frames" in rejects["cut.mkv"]["detail"]
    assert rejects["random.avi"]["reason"] == "unreadable"
    sharded = {r["source"]: r for r in manifest}
    assert set(sharded) == {"whole.mkv", "cut_late.mkv", "tiny.mp4", "sub/silent.webm"}
    assert sharded["sub/silent.webm"]["quality"]["audio"] == "none"
    assert sharded["whole.mkv"]["quality"]["audio"] != "none"
    assert stats["inputs"] == 7 and stats["inputs_rejected"] == 3


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_shards(sample, tmp_path):
    settings = ["max_samples_per_shard=1", "annotators.pose.backend=sidecar",
                "annotators.face.backend=sidecar"]  # fmt: skip
    reference = tmp_path / "reference"
    run_shard(ShardConfig(
        input_dir=str(sample.corpus), output_dir=str(reference), max_samples_per_shard=1,
        annotators={**ShardConfig().annotators,
                    "pose": {**ShardConfig().annotators["pose"], "backend": "sidecar"},
                    "face": {**ShardConfig().annotators["face"], "backend": "sidecar"}},
    ))  # fmt: skip
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_pipelines.shard", f"input_dir={sample.corpus}",
               f"output_dir={out}", *settings]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "progress").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "stats.json").exists()  # it died before the end
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def contents(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip

    assert contents(out) == contents(reference)
