"""Helpers for tests in any folder: sample-corpus shards built in-process (no Hydra, no
subprocess), and small readers / writers of the on-disk formats."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import av
import numpy as np

from data_pipelines.config import SampleCorpusConfig, ShardConfig
from data_pipelines.merge import read_jsonl  # noqa: F401 - re-exported for tests
from data_pipelines.pipeline import run_shard
from data_pipelines.sample_corpus import make_sample_corpus


def build_sample_shards(
    tmp_dir: Path | str, num_clips: int = 4, seed: int = 0, **shard_overrides
) -> Path:
    """Write a sample corpus to TMP/corpus and shard it into TMP/data; returns TMP/data
    (shards in TMP/data/shards/*.tar). ``shard_overrides`` set ShardConfig fields."""
    tmp_dir = Path(tmp_dir)
    corpus, output = tmp_dir / "corpus", tmp_dir / "data"
    make_sample_corpus(
        SampleCorpusConfig(out_dir=str(corpus), seed=seed, num_clips=num_clips, voice="synthetic")
    )
    run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(output), **shard_overrides))
    return output


def shard_members(data_dir: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over every shard of DATA_DIR/shards, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((Path(data_dir) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def decode_mp4(payload: bytes) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(frames (T, H, W, 3) uint8, mono audio or None, its sample rate or None)."""
    with av.open(io.BytesIO(payload)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(io.BytesIO(payload)) as container:
        if not container.streams.audio:
            return frames, None, None
        stream = container.streams.audio[0]
        if stream.codec_context.channels != 1:
            raise ValueError(f"audio has {stream.codec_context.channels} channels, expected 1")
        rate = stream.codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    return frames, audio, rate


def write_audio_only(path: Path, seconds: float = 3.0, rate: int = 16000) -> None:
    """An mp4 holding only an AAC track (a 220 Hz tone): an input with no video stream."""
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * rate)) / rate)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            tone.astype(np.float32)[None], format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
