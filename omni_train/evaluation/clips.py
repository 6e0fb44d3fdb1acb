"""Held-out clips for self-reenactment, read from shards with the training decoder.

Clips come in key order (all shards, sorted), so the same shards always give the same clips.
Each is decoded from its first frame at the run's resolution and fps, with its 16 kHz audio
and keypoints; a clip that cannot serve the task is skipped with the reason, never dropped
silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from omni_train.data.config import DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.shards import index_shard, read_sample, shard_list


@dataclass
class HeldOutClip:
    key: str
    # (3, T, H, W) in [-1, 1] at the run's resolution and fps, from the clip's first frame.
    frames: torch.Tensor
    # 16 kHz mono covering the T frames (zeros when the clip has no audio track).
    audio: torch.Tensor
    has_audio: bool
    # (T, 17, 3) normalised to the output frame; [0, 0, 0] where a joint is absent.
    keypoints: torch.Tensor
    caption: str
    quality: dict

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[1])


@dataclass(frozen=True)
class SkippedClip:
    key: str
    reason: str


class _FromTheStart:
    """Stands in for the decoder's random generator: every window starts at the first frame."""

    def integers(self, low: int, high: int) -> int:
        return low


def frames_at_rate(clip_frames: int, clip_fps: float, fps: float) -> int:
    """How many frames at ``fps`` the clip holds, frame j being the source frame nearest j / fps
    (as the training decoder resamples)."""
    count = int((clip_frames - 1) * fps / clip_fps) + 1
    while count > 1 and round((count - 1) * clip_fps / fps) > clip_frames - 1:
        count -= 1
    while round(count * clip_fps / fps) <= clip_frames - 1:
        count += 1
    return count


def sample_refs(shards: str) -> list:
    """Every sample of the shards, sorted by key (then shard)."""
    try:
        paths = shard_list(shards)
    except ValueError as err:
        raise ValueError(str(err).replace("data.shards=", "shards=")) from err
    refs = [ref for path in paths for ref in index_shard(path)]
    if not refs:
        raise ValueError(f"shards={shards!r} hold no samples: re-run data_pipelines.shard")
    return sorted(refs, key=lambda ref: (ref.key, ref.shard))


def held_out_clips(
    shards: str,
    data: DataConfig,
    task: str,
    max_frames: int,
    reference_frame: int,
) -> Iterator[HeldOutClip | SkippedClip]:
    """Each sample of ``shards`` in key order: a clip of at most ``max_frames`` frames (0 = its
    whole length) at the run's resolution and fps, or the reason it cannot be evaluated."""
    for ref in sample_refs(shards):
        try:
            raw = read_sample(ref)
            clip_frames, clip_fps = _clip_length(ref.key, raw)
        except CorruptSample as err:
            yield SkippedClip(ref.key, err.reason)
            continue
        available = frames_at_rate(clip_frames, clip_fps, data.fps)
        if available < data.num_frames:
            yield SkippedClip(
                ref.key,
                f"clip shorter than one segment: {available} frames at {data.fps:g} fps "
                f"({clip_frames} at {clip_fps:g} fps), a segment is data.num_frames="
                f"{data.num_frames}",
            )
            continue
        length = min(available, max_frames) if max_frames > 0 else available
        if reference_frame >= length:
            yield SkippedClip(
                ref.key,
                f"reference_frame={reference_frame} is past the {length} frames evaluated",
            )
            continue
        window = replace(data, num_frames=length, precomputed=False, buckets=[], sources=[])
        try:
            sample = decode_sample(raw, window, _FromTheStart())
        except CorruptSample as err:
            yield SkippedClip(ref.key, err.reason)
            continue
        if task in ("audio", "pose") and not sample["has_audio"]:
            yield SkippedClip(ref.key, f"no audio track: task={task} needs the clip's audio")
            continue
        if task == "pose" and not bool((sample["keypoints"][..., 2] > 0).any()):
            yield SkippedClip(ref.key, "no keypoints in the clip: task=pose needs them")
            continue
        yield HeldOutClip(
            key=ref.key,
            frames=sample["video"],
            audio=sample["audio"],
            has_audio=bool(sample["has_audio"]),
            keypoints=sample["keypoints"],
            caption=sample["caption"],
            quality=sample["quality"],
        )


def _clip_length(key: str, raw: dict) -> tuple[int, float]:
    if not isinstance(raw.get("json"), bytes | bytearray):
        raise CorruptSample(key, "has no json member")
    try:
        meta = json.loads(bytes(raw["json"]).decode("utf-8"))
        return int(meta["num_frames"]), float(meta["fps"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CorruptSample(key, f"json has no numeric num_frames and fps ({err})") from err


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, as the mp4 writer rounds them."""
    from omni_train.media import to_uint8_frames

    return to_uint8_frames(frames)
