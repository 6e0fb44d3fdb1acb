"""Tiny real shards for loader tests: H.264 mp4 clips (with or without AAC 16 kHz mono audio)
and json metadata written as WebDataset tar members, in the format data_pipelines.shard writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

AUDIO_RATE = 16_000
TIERS = {"text": "strong", "ref": "strong", "audio": "weak", "pose": "none"}


def encode_mp4(frames: np.ndarray, fps: float, audio: np.ndarray | None = None) -> bytes:
    """(T, H, W, 3) uint8 frames -> mp4 bytes, with an AAC mono track when audio is given."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        track = None
        if audio is not None:
            track = container.add_stream("aac", rate=AUDIO_RATE)
            track.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if track is not None:
            chunk = av.AudioFrame.from_ndarray(
                audio.astype(np.float32)[None], format="flt", layout="mono"
            )
            chunk.sample_rate = AUDIO_RATE
            chunk.pts = 0  # lets the muxer record the encoder delay, keeping audio aligned
            container.mux(track.encode(chunk))
            container.mux(track.encode())
    return buffer.getvalue()


def gray_frames(num_frames: int, height: int, width: int, step: int = 10) -> np.ndarray:
    """Frame i is uniformly gray at level i * step, so a decoded frame tells its index."""
    levels = (np.arange(num_frames) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def clip_key(source: str, clip_index: int = 0) -> str:
    return f"{hashlib.sha1(source.encode()).hexdigest()[:16]}_c{clip_index:04d}"


def meta_json(
    key: str,
    num_frames: int,
    fps: float,
    height: int,
    width: int,
    has_audio: bool,
    keypoints: np.ndarray | None = None,
    caption: str = "",
    quality: dict | None = None,
) -> bytes:
    meta = {
        "key": key,
        "source": f"{key}.mp4",
        "clip_index": 0,
        "start": 0.0,
        "end": num_frames / fps,
        "fps": fps,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "has_audio": has_audio,
        "caption": caption,
        "keypoints": None if keypoints is None else np.asarray(keypoints).tolist(),
        "keypoints_format": None if keypoints is None else "coco17",
        "quality": {**(quality or TIERS), "scores": {"sync": 0.5}},
    }
    return json.dumps(meta).encode("utf-8")


def make_sample(
    source: str,
    num_frames: int = 16,
    fps: float = 8.0,
    height: int = 24,
    width: int = 32,
    with_audio: bool = True,
    with_keypoints: bool = True,
) -> dict[str, bytes | str]:
    key = clip_key(source)
    frames = gray_frames(num_frames, height, width)
    audio = None
    if with_audio:
        t = np.arange(round(num_frames / fps * AUDIO_RATE)) / AUDIO_RATE
        audio = 0.3 * np.sin(2 * np.pi * 330 * t)
    keypoints = None
    if with_keypoints:
        keypoints = np.full((num_frames, 17, 3), 0.5, np.float32)
        keypoints[..., 2] = 1.0
    return {
        "__key__": key,
        "mp4": encode_mp4(frames, fps, audio),
        "json": meta_json(
            key, num_frames, fps, height, width, with_audio, keypoints, caption=f"clip {source}"
        ),
    }


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write samples ({"__key__": key, ext: bytes, ...}) as adjacent tar members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="session")
def media() -> SimpleNamespace:
    """The shard-building helpers, for tests that build their own special shards."""
    return SimpleNamespace(
        encode_mp4=encode_mp4,
        gray_frames=gray_frames,
        clip_key=clip_key,
        meta_json=meta_json,
        make_sample=make_sample,
        write_shard=write_shard,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """8 shards x 3 clips (16 frames, 32x24, 8 fps), alternating with and without audio."""
    root = tmp_path_factory.mktemp("corpus")
    keys = []
    for shard in range(8):
        samples = [
            make_sample(f"video_{shard}_{i}.mp4", with_audio=(shard + i) % 2 == 0) for i in range(3)
        ]
        keys += [s["__key__"] for s in samples]
        write_shard(root / f"shard-{shard:06d}.tar", samples)
    return SimpleNamespace(pattern=str(root / "shard-*.tar"), root=root, keys=keys)
