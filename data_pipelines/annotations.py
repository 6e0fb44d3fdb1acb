"""Sidecar annotations next to an input video: NAME.txt (caption), NAME.pose.json (COCO-17).

NAME.pose.json: {"format": "coco17", "fps": float, "frames": [[[x, y, vis] * 17] * N]} with
x, y normalised to [0, 1] and frame k at time k / fps from the first video frame.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NUM_JOINTS = 17


@dataclass(frozen=True)
class PoseTrack:
    keypoints: np.ndarray  # (N, 17, 3) float32
    fps: float


@dataclass(frozen=True)
class Sidecars:
    caption: str
    pose: PoseTrack | None


def sidecar_paths(video: Path) -> tuple[Path, Path]:
    stem = video.with_suffix("")
    return stem.with_name(stem.name + ".txt"), stem.with_name(stem.name + ".pose.json")


def read_sidecars(video: Path) -> Sidecars:
    """The caption ("" when absent) and pose track (None when absent or malformed)."""
    caption_path, pose_path = sidecar_paths(video)
    caption = ""
    if caption_path.is_file():
        caption = " ".join(caption_path.read_text(encoding="utf-8", errors="replace").split())
    pose = None
    if pose_path.is_file():
        try:
            pose = parse_pose(json.loads(pose_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError) as err:
            log.warning(
                "ignoring %s: %s (expected {'format': 'coco17', 'fps': float, "
                "'frames': [[[x, y, vis] * 17] * N]})",
                pose_path,
                err,
            )
    return Sidecars(caption, pose)


def parse_pose(data: dict) -> PoseTrack:
    if data.get("format") != "coco17":
        raise ValueError(f"format is {data.get('format')!r}, only 'coco17' is supported")
    fps = float(data["fps"])
    if not fps > 0:
        raise ValueError(f"fps is {fps}")
    keypoints = np.asarray(data["frames"], dtype=np.float32)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_JOINTS, 3) or len(keypoints) == 0:
        raise ValueError(f"frames have shape {keypoints.shape}, expected (N, 17, 3)")
    if not np.isfinite(keypoints).all():
        raise ValueError("frames contain NaN or infinity")
    return PoseTrack(keypoints, fps)


def keypoints_at(track: PoseTrack, times: np.ndarray) -> np.ndarray:
    """(T, 17, 3) keypoints of the pose frame nearest each time; zeros where it has none."""
    index = np.round(np.asarray(times) * track.fps).astype(int)
    out = np.zeros((len(index), NUM_JOINTS, 3), np.float32)
    inside = (index >= 0) & (index < len(track.keypoints))
    out[inside] = track.keypoints[index[inside]]
    return out
