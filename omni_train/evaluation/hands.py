"""HKC / HKV: hand keypoint confidence and variance (the paper's body metrics), by MediaPipe.

MediaPipe Hands (mediapipe 0.10.21's bundled legacy solution, offline; ``static_image_mode``
so every frame is scored on its own, up to two hands, detection confidence 0.5) runs on every
``MetricsConfig.hands_stride``-th frame. The legacy solution exposes one confidence per
detected hand (its handedness score; hands below the 0.5 detection threshold are not
reported), not one per keypoint, so:
- ``hkc``: mean over sampled frames of the best hand's confidence, a frame without a detected
  hand scoring 0 (as a keypoint detector's near-zero confidence there); higher is better.
- ``hkv``: variance over time of the 21 hand keypoints (x and y in image-normalised [0, 1]
  coordinates, averaged over keypoints, both axes and hands); hands are followed from frame to
  frame by wrist proximity (handedness labels flip on hard frames). Higher = richer motion.
- ``hand_fraction``: sampled frames with at least one detected hand.
When no frame shows a hand, ``hkc`` and ``hkv`` are None with that reason: a talking head
without hands has no hand quality to measure. At 64 x 64 (the demo resolution) hands are a
few pixels wide, below what MediaPipe detects: expect that reason there. Cost: ~20 ms per
176 x 144 frame on one core.
"""

from __future__ import annotations

import numpy as np

from omni_train.evaluation.faces import unavailable
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import MetricsConfig

MAX_HANDS = 2
DETECTION_CONFIDENCE = 0.5
# A detection farther than this (normalised units) from every followed hand starts a new one.
NEW_HAND_DISTANCE = 0.25


def detect_hands(model, frame: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """[(confidence, (21, 2) normalised x, y)] of the hands in one RGB frame."""
    result = model.process(np.ascontiguousarray(frame))
    if result.multi_hand_landmarks is None:
        return []
    return [
        (float(side.classification[0].score),
         np.array([(p.x, p.y) for p in hand.landmark], dtype=np.float64))
        for hand, side in zip(result.multi_hand_landmarks, result.multi_handedness, strict=True)
    ]  # fmt: skip


def follow_hands(frames: list[list[tuple[float, np.ndarray]]]) -> list[list[np.ndarray]]:
    """Group per-frame detections into at most two hand tracks by wrist proximity."""
    tracks: list[list[np.ndarray]] = []
    for hands in frames:
        taken: set[int] = set()
        for _, points in sorted(hands, key=lambda h: -h[0]):
            gaps = [
                (np.linalg.norm(track[-1][0] - points[0]), i)
                for i, track in enumerate(tracks)
                if i not in taken
            ]
            gap, index = min(gaps, default=(np.inf, -1))
            if gap > NEW_HAND_DISTANCE and len(tracks) < MAX_HANDS:
                tracks.append([points])
                taken.add(len(tracks) - 1)
            elif index >= 0:
                tracks[index].append(points)
                taken.add(index)
    return tracks


def hand_keypoint_variance(tracks: list[list[np.ndarray]]) -> float | None:
    """Mean over hands (seen in >= 2 frames), keypoints and axes of the variance over time."""
    per_hand = [float(np.var(np.stack(t), axis=0).mean()) for t in tracks if len(t) >= 2]
    return float(np.mean(per_hand)) if per_hand else None


class HandKeypointMetric:
    name = "hands"

    def __init__(self, cfg: MetricsConfig | None = None) -> None:
        from data_pipelines.annotators.mediapipe_compat import import_mediapipe

        self.cfg = cfg or MetricsConfig()
        self.stride = max(1, self.cfg.hands_stride)
        self.reason = None
        self.mp = None
        try:
            self.mp = import_mediapipe("hand keypoint metrics (HKC / HKV)", required=False)
        except Exception as err:  # a broken install must not stop the other metrics
            self.reason = f"mediapipe failed to import: {err}"
        if self.mp is None and self.reason is None:
            self.reason = "mediapipe is not installed (make venv installs mediapipe==0.10.21)"
        self.method = (f"MediaPipe Hands 0.10.21 (static images, <= {MAX_HANDS} hands, detection "
                       f"confidence {DETECTION_CONFIDENCE}), every {self.stride}. frame")  # fmt: skip

    def _keys(self) -> dict[str, tuple[str, bool]]:
        return {
            "hkc": (f"mean best-hand confidence per frame (0 without a hand); {self.method}",
                    True),
            "hkv": (f"variance over time of hand keypoints (normalised x, y; mean over "
                    f"keypoints, axes, hands); {self.method}", True),
            "hand_fraction": (f"frames with a detected hand; {self.method}", True),
        }  # fmt: skip

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        keys = self._keys()
        if self.mp is None:
            return unavailable(keys, self.reason)
        with self.mp.solutions.hands.Hands(
            static_image_mode=True,
            max_num_hands=MAX_HANDS,
            min_detection_confidence=DETECTION_CONFIDENCE,
        ) as model:
            found = [detect_hands(model, frame) for frame in video[:: self.stride]]
        (hkc_method, _), (hkv_method, _), (fraction_method, _) = keys.values()
        out = {
            "hand_fraction": MetricValue(float(np.mean([bool(h) for h in found])), fraction_method)
        }
        if not any(found):
            reason = f"no hand detected in any of the {len(found)} sampled frames"
            out["hkc"] = MetricValue.missing(hkc_method, reason)
            out["hkv"] = MetricValue.missing(hkv_method, reason)
            return out
        confidences = [max((c for c, _ in hands), default=0.0) for hands in found]
        out["hkc"] = MetricValue(float(np.mean(confidences)), hkc_method, series=confidences)
        hkv = hand_keypoint_variance(follow_hands(found))
        out["hkv"] = (
            MetricValue(hkv, hkv_method)
            if hkv is not None
            else MetricValue.missing(hkv_method, "no hand was detected in two sampled frames")
        )
        return out
