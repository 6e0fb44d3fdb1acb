"""The side-by-side mp4 of one clip: real | static reference | generated, with the clip's audio."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from omni_train.media import AUDIO_RATE, write_mp4

COLUMNS: tuple[str, ...] = ("real", "static_reference", "generated")
GAP = 2  # white pixels between columns


def grid_frames(columns: list[np.ndarray]) -> np.ndarray:
    """(T, H, W, 3) uint8 videos side by side, as long as the longest; a shorter one (the real
    clip, when the generation runs past its end) continues as black frames."""
    length = max(len(video) for video in columns)
    height, width = columns[0].shape[1:3]
    gap = np.full((length, height, GAP, 3), 255, np.uint8)
    parts = []
    for index, video in enumerate(columns):
        if video.shape[1:] != (height, width, 3):
            raise ValueError(
                f"grid column {index} has frames {video.shape[1:]}, expected {(height, width, 3)}"
            )
        padded = np.zeros((length, height, width, 3), np.uint8)
        padded[: len(video)] = video
        parts.extend([gap, padded] if parts else [padded])
    return np.concatenate(parts, axis=2)


def grid_name(index: int, key: str) -> str:
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.mp4"


def write_grid(
    path: Path,
    real: np.ndarray,
    static: np.ndarray,
    generated: np.ndarray,
    fps: float,
    audio: np.ndarray | None,
) -> Path:
    """Write the grid mp4; ``audio`` (16 kHz) is padded with silence to the grid's length."""
    frames = grid_frames([real, static, generated])
    track = None
    if audio is not None:
        track = np.zeros(round(len(frames) / fps * AUDIO_RATE), np.float32)
        piece = audio[: len(track)]
        track[: len(piece)] = piece
    write_mp4(path, frames, fps, track, AUDIO_RATE)
    return path
