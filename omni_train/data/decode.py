"""Decode one raw shard sample ({"__key__", "mp4", "json"} bytes) into training tensors.

Only the mp4 and json members are ever read; nothing is unpickled. Everything random (the
window start, the reference frame) comes from the numpy Generator passed in, so a sample's
tensors are a pure function of its bytes, the config and that generator.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F

from omni_train.contracts import CONDITIONS, SHARD_MEMBERS, TIERS
from omni_train.data.config import DataConfig

NUM_JOINTS = 17  # COCO-17


class CorruptSample(Exception):
    """A sample that cannot be decoded; the stream skips and counts it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sample {key!r}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Window:
    """Which source frames feed the window and the reference, and when the window starts."""

    frame_indices: list[int]
    ref_index: int
    start_seconds: float


@dataclass(frozen=True)
class CropGeometry:
    """Resize to (resized_h, resized_w) so the target is covered, then crop at (top, left)."""

    resized_h: int
    resized_w: int
    top: int
    left: int
    out_h: int
    out_w: int


def decode_sample(raw: dict[str, Any], cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Decode a raw sample into a window of ``cfg.num_frames`` frames and its conditions.

    Returns video (3, T, H, W) and ref (3, H, W) in [-1, 1]; audio (S,) at
    ``cfg.audio_sample_rate`` covering the window (zeros without a track); keypoints
    (T, 17, 3) normalised to the output frame ([0, 0, 0] where absent, invisible or cropped
    away); key, caption, quality and has_audio.
    Raises CorruptSample when the sample cannot be used.
    """
    key = str(raw.get("__key__", "?"))
    for member in SHARD_MEMBERS:
        if not isinstance(raw.get(member), bytes | bytearray):
            raise CorruptSample(key, f"has no {member} member")
    meta = _parse_meta(key, raw["json"])
    src_fps = meta["fps"]
    window = choose_window(meta["num_frames"], src_fps, cfg.num_frames, cfg.fps, rng)
    if window is None:
        raise CorruptSample(
            key,
            f"clip has {meta['num_frames']} frames at {src_fps} fps, shorter than a window of "
            f"{cfg.num_frames} frames at {cfg.fps} fps",
        )
    try:
        frames = _decode_frames(raw["mp4"], sorted({*window.frame_indices, window.ref_index}))
        waveform, has_audio = _decode_window_audio(
            raw["mp4"], window.start_seconds, cfg.audio_samples, cfg.audio_sample_rate
        )
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise CorruptSample(key, f"mp4 does not decode: {err}") from err
    missing = [i for i in window.frame_indices + [window.ref_index] if i not in frames]
    if missing:
        raise CorruptSample(
            key, f"mp4 ends before frame {missing[0]} (json says {meta['num_frames']} frames)"
        )

    height, width = frames[window.ref_index].shape[:2]
    out_h, out_w = cfg.resolution
    geometry = crop_geometry(height, width, out_h, out_w)
    video = resize_crop(np.stack([frames[i] for i in window.frame_indices]), geometry)
    ref = resize_crop(frames[window.ref_index][None], geometry)[0]
    keypoints = _window_keypoints(key, meta["keypoints"], meta["num_frames"], window)
    return {
        "video": video.permute(1, 0, 2, 3).contiguous(),
        "ref": ref,
        "audio": torch.from_numpy(waveform),
        "keypoints": torch.from_numpy(transform_keypoints(keypoints, geometry)),
        "key": key,
        "caption": meta["caption"],
        "quality": meta["quality"],
        "has_audio": has_audio,
    }


# ----------------------------------------------------------------------------- metadata
def _parse_meta(key: str, payload: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptSample(key, f"json member is not UTF-8 JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CorruptSample(key, "json member is not an object")
    try:
        fps = float(meta["fps"])
        num_frames = int(meta["num_frames"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptSample(key, f"json needs numeric fps and num_frames ({err})") from err
    if fps <= 0 or num_frames < 1:
        raise CorruptSample(key, f"json has fps={fps}, num_frames={num_frames}")
    quality = meta.get("quality")
    if not isinstance(quality, dict):
        raise CorruptSample(key, "json has no quality object")
    for condition in CONDITIONS:
        if quality.get(condition) not in TIERS:
            raise CorruptSample(
                key, f"json quality.{condition}={quality.get(condition)!r}, expected {TIERS}"
            )
    caption = meta.get("caption") or ""
    return {
        "fps": fps,
        "num_frames": num_frames,
        "caption": str(caption),
        "quality": quality,
        "keypoints": meta.get("keypoints"),
    }


def _window_keypoints(key: str, keypoints: Any, num_frames: int, window: Window) -> np.ndarray:
    """(T, 17, 3) keypoints of the window frames, zeros when the json has none."""
    if keypoints is None:
        return np.zeros((len(window.frame_indices), NUM_JOINTS, 3), np.float32)
    try:
        array = np.asarray(keypoints, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise CorruptSample(key, f"json keypoints are not numeric: {err}") from err
    if array.ndim != 3 or array.shape[1:] != (NUM_JOINTS, 3) or len(array) < num_frames:
        raise CorruptSample(
            key,
            f"json keypoints have shape {array.shape}, expected ({num_frames}, {NUM_JOINTS}, 3)",
        )
    return array[window.frame_indices]


# ----------------------------------------------------------------------------- window
def choose_window(
    clip_frames: int, clip_fps: float, num_frames: int, fps: float, rng: np.random.Generator
) -> Window | None:
    """Pick a window start and a reference frame; None when the clip is too short.

    Window frame j shows the source frame nearest to time start + j / fps. The reference is
    a frame outside the window when the clip has one (so the model cannot copy it), else the
    window's first frame.
    """
    offsets = [round(j * clip_fps / fps) for j in range(num_frames)]
    last_start = clip_frames - 1 - offsets[-1]
    if last_start < 0:
        return None
    start = int(rng.integers(0, last_start + 1))
    indices = [start + offset for offset in offsets]
    outside = [i for i in range(clip_frames) if i < indices[0] or i > indices[-1]]
    ref_index = int(outside[rng.integers(0, len(outside))]) if outside else indices[0]
    return Window(indices, ref_index, start / clip_fps)


# ----------------------------------------------------------------------------- video
def _decode_frames(mp4: bytes, wanted: list[int]) -> dict[int, np.ndarray]:
    """The wanted frame indices (sorted) as HxWx3 uint8 RGB; stops after the last one."""
    frames: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    with av.open(io.BytesIO(mp4)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted_set:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    return frames


def crop_geometry(height: int, width: int, out_h: int, out_w: int) -> CropGeometry:
    """Scale so the output is covered, keeping aspect, then center-crop the excess."""
    scale = max(out_h / height, out_w / width)
    resized_h = max(out_h, round(height * scale))
    resized_w = max(out_w, round(width * scale))
    return CropGeometry(
        resized_h, resized_w, (resized_h - out_h) // 2, (resized_w - out_w) // 2, out_h, out_w
    )


def resize_crop(frames: np.ndarray, geometry: CropGeometry) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    size = (geometry.resized_h, geometry.resized_w)
    if pixels.shape[-2:] != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)
    g = geometry
    pixels = pixels[..., g.top : g.top + g.out_h, g.left : g.left + g.out_w]
    return (pixels / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


def transform_keypoints(keypoints: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """Map [x, y, vis] normalised to the clip frame into the resized and cropped frame.

    Joints that are invisible or land outside the crop become [0, 0, 0].
    """
    g = geometry
    out = keypoints.astype(np.float32, copy=True)
    out[..., 0] = (keypoints[..., 0] * g.resized_w - g.left) / g.out_w
    out[..., 1] = (keypoints[..., 1] * g.resized_h - g.top) / g.out_h
    inside = (out[..., 0] >= 0) & (out[..., 0] <= 1) & (out[..., 1] >= 0) & (out[..., 1] <= 1)
    keep = inside & (keypoints[..., 2] > 0)
    return np.where(keep[..., None], out, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- audio
def _decode_window_audio(
    mp4: bytes, start_seconds: float, num_samples: int, sample_rate: int
) -> tuple[np.ndarray, bool]:
    """Mono float32 audio of [start, start + num_samples / rate); zeros without a track."""
    window = np.zeros(num_samples, np.float32)
    with av.open(io.BytesIO(mp4)) as container:
        if not container.streams.audio:
            return window, False
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, track_start = [], None
        for frame in container.decode(audio=0):
            if track_start is None:
                track_start = frame.time or 0.0
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if not chunks:
        return window, False
    track = np.concatenate(chunks).astype(np.float32)
    # Sample index in `track` of the window start (the track may not begin at t = 0).
    begin = round((start_seconds - (track_start or 0.0)) * sample_rate)
    src_lo, src_hi = max(begin, 0), min(begin + num_samples, len(track))
    if src_hi > src_lo:
        window[src_lo - begin : src_hi - begin] = track[src_lo:src_hi]
    return window, True
