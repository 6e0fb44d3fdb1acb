"""Image quality (sharpness, contrast, brightness) and motion amplitude (optical flow)."""

from __future__ import annotations

import numpy as np

from data_pipelines import measures
from data_pipelines.annotators.base import ClipView, Findings, optional_import, warn_once

MOTION_BACKENDS = ("auto", "farneback", "frame_diff")


class ImageQuality:
    """``sharpness`` (variance of the Laplacian, 0-255 grey), ``contrast``, ``brightness``."""

    name = "image_quality"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        found.scores["sharpness"] = measures.sharpness(clip.frames, clip.grey)
        found.scores["contrast"] = clip.contrast
        found.scores["brightness"] = measures.brightness(clip.frames, clip.grey)
        found.methods["image_quality"] = "laplacian_variance"


class Motion:
    """Motion amplitude: ``motion`` (mean absolute frame difference, 0-1) always, and
    ``flow_motion`` (mean dense optical-flow magnitude per frame, as a fraction of the frame
    diagonal) with OpenCV's Farneback flow. ``backend``: auto (flow when OpenCV is
    installed), farneback (required), frame_diff."""

    name = "motion"

    def __init__(self, backend: str = "auto", max_pairs: int = 48) -> None:
        if backend not in MOTION_BACKENDS:
            raise ValueError(f"annotators.motion.backend={backend!r}: use one of {MOTION_BACKENDS}")
        self.backend, self.max_pairs = backend, max_pairs
        self._cv2 = None
        if backend != "frame_diff":
            self._cv2 = optional_import("cv2", "motion backend=farneback", backend == "farneback")
            if self._cv2 is None:
                warn_once("OpenCV is not installed: motion is measured by frame difference only")
        self.resolved = "frame_diff" if self._cv2 is None else "farneback"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        found.scores["motion"] = measures.motion(clip.frames, clip.grey)
        found.methods["motion"] = "frame_diff"
        if self._cv2 is not None and len(clip.frames) >= 2:
            found.scores["flow_motion"] = farneback_motion(self._cv2, clip.grey, self.max_pairs)
            found.methods["motion"] = "farneback_flow"


def farneback_motion(cv2, grey_frames: np.ndarray, max_pairs: int) -> float:
    """Mean flow magnitude between consecutive frames / frame diagonal, over at most
    ``max_pairs`` evenly spread pairs; ``grey_frames`` = measures.grey(frames)."""
    grey = grey_frames.clip(0, 255).astype(np.uint8)
    pairs = np.unique(np.linspace(0, len(grey) - 2, min(max_pairs, len(grey) - 1)).round())
    diagonal = float(np.hypot(*grey.shape[1:3]))
    magnitudes = []
    for k in pairs.astype(int):
        flow = cv2.calcOpticalFlowFarneback(grey[k], grey[k + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(magnitudes)) / diagonal
