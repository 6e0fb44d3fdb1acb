"""Body pose (COCO-17 with visibility), hand keypoints and face landmarks per frame.

Sidecar keypoints (``NAME.pose.json``, e.g. from DWPose) win when present: they are the
user's own annotation. Otherwise MediaPipe Holistic (bundled in the mediapipe 0.10.21 wheel,
runs offline) gives 33 body landmarks with visibility, 21 landmarks per hand and a 468-point
face mesh; the body is mapped to COCO-17 for the sample's ``keypoints`` (the pose condition is
rendered from them at training time) and the inner-lip gap of the face mesh is handed on as
the ``mouth_opening`` signal for the lip-sync annotator.

``every_n_frames`` = N > 1 runs Holistic on every Nth frame and the last (see stride.py): the
body keypoints (x, y and visibility), hands and mouth opening of the frames between are
interpolated, and the method reads ``mediapipe_holistic_C/every_N``.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import measures
from data_pipelines.annotations import NUM_JOINTS, keypoints_at
from data_pipelines.annotators.base import ClipView, Findings, warn_once
from data_pipelines.annotators.mediapipe_compat import import_mediapipe
from data_pipelines.annotators.stride import (
    check_every_n_frames,
    interpolate,
    interpolate_points,
    measured_frames,
    with_stride,
)

POSE_BACKENDS = ("auto", "mediapipe", "sidecar")
# MediaPipe Pose landmark index of each COCO-17 joint (nose, eyes, ears, shoulders, elbows,
# wrists, hips, knees, ankles; left before right).
MEDIAPIPE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
HAND_POINTS = 21
# Face-mesh indices: inner upper / lower lip, and the mouth corners.
UPPER_LIP, LOWER_LIP, MOUTH_LEFT, MOUTH_RIGHT = 13, 14, 61, 291


class BodyPose:
    """``keypoints`` (T, 17, 3) in the sample, ``hands`` (T x [left, right], each 21 x 3 or
    null) with MediaPipe; scores ``pose_visibility``, ``head_visibility``, ``pose_jitter``,
    ``keypoint_motion`` and, with MediaPipe, ``hand_fraction``.

    backend: auto (sidecar when present, else MediaPipe when installed, else nothing, with a
    warning), mediapipe (sidecar when present and ``use_sidecar``, else MediaPipe, required),
    sidecar (only sidecars). ``every_n_frames``: run MediaPipe on every Nth frame (and the
    last), interpolating between (sidecars are read on every frame).
    """

    name = "pose"

    def __init__(
        self,
        backend: str = "auto",
        use_sidecar: bool = True,
        model_complexity: int = 1,
        min_detection_confidence: float = 0.5,
        hands: bool = True,
        every_n_frames: int = 1,
    ) -> None:
        if backend not in POSE_BACKENDS:
            raise ValueError(f"annotators.pose.backend={backend!r}: use one of {POSE_BACKENDS}")
        self.every_n_frames = check_every_n_frames("annotators.pose.every_n_frames", every_n_frames)
        self.backend, self.use_sidecar = backend, use_sidecar or backend == "sidecar"
        self.model_complexity = model_complexity
        self.min_detection_confidence = min_detection_confidence
        self.hands = hands
        self._mp = None
        if backend != "sidecar":
            self._mp = import_mediapipe("pose backend=mediapipe", backend == "mediapipe")
            if self._mp is None:
                warn_once(
                    "mediapipe is not installed: only sidecar keypoints give poses "
                    "(pip install -e '.[annotate]')"
                )
        self.resolved = "sidecar" if self._mp is None else "sidecar+mediapipe"
        if not self.use_sidecar:
            self.resolved = "mediapipe"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        keypoints, jitter_centres = None, None
        if self.use_sidecar and clip.sidecar_pose is not None:
            times = clip.start + np.arange(len(clip.frames)) / clip.fps
            keypoints = keypoints_at(clip.sidecar_pose, times)
            found.methods["pose"] = "sidecar"
        elif self._mp is not None:
            keypoints = self._from_model(clip.frames, found)
            jitter_centres = self._jitter_centres(len(clip.frames))
        if keypoints is None:
            return
        found.fields["keypoints"] = np.round(keypoints.astype(np.float64), 4).tolist()
        found.fields["keypoints_format"] = "coco17"
        found.signals["keypoints"] = keypoints
        found.scores["pose_visibility"] = measures.pose_visibility(keypoints)
        found.scores["head_visibility"] = measures.head_visibility(keypoints)
        found.scores["pose_jitter"] = measures.pose_jitter(keypoints, jitter_centres)
        found.scores["keypoint_motion"] = measures.keypoint_motion(keypoints)

    def _from_model(self, frames: np.ndarray, found: Findings) -> np.ndarray:
        """Holistic on the measured frames, the rest interpolated; leaves the hands, the
        mouth signal and the detection rates (over the measured frames) in ``found``."""
        measured = measured_frames(len(frames), self.every_n_frames)
        keypoints, detected, hands, mouth = self._holistic(frames[measured])
        method = f"mediapipe_holistic_{self.model_complexity}"
        found.methods["pose"] = with_stride(method, self.every_n_frames)
        found.scores["face_landmark_fraction"] = float(np.isfinite(mouth).mean())
        found.signals["mouth_opening"] = interpolate(
            mouth, measured, len(frames), np.isfinite(mouth), np.nan
        )
        if self.hands:
            found.scores["hand_fraction"] = float(
                np.mean([left is not None or right is not None for left, right in hands])
            )
            sides = [interpolate_points([pair[s] for pair in hands], measured, len(frames), 4)
                     for s in (0, 1)]  # fmt: skip
            found.fields["hands"] = [list(pair) for pair in zip(*sides, strict=True)]
            found.fields["hands_format"] = "mediapipe21"
        return interpolate(keypoints, measured, len(frames), detected, 0.0)

    def _jitter_centres(self, num_frames: int) -> np.ndarray | None:
        """With a stride, jitter is read at the measured frames only: the interpolated ones
        have no acceleration, and at a measured frame t the stored track's second difference
        is (x[t+N] - 2 x[t] + x[t-N]) / N, the model's own jitter over N frames."""
        if self.every_n_frames == 1:
            return None
        return measured_frames(num_frames, self.every_n_frames)

    def _holistic(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
        """Per frame: COCO-17 keypoints (zeros without a body), whether a body was found,
        [left, right] hands, the mouth opening (NaN without a face mesh)."""
        # A fresh graph per clip: tracking state must not leak from one clip to the next, or
        # the results would depend on which clips a worker happened to see before.
        keypoints = np.zeros((len(frames), NUM_JOINTS, 3), np.float32)
        detected = np.zeros(len(frames), bool)
        mouth = np.full(len(frames), np.nan, np.float32)
        hands: list = []
        with self._mp.solutions.holistic.Holistic(
            static_image_mode=False,
            model_complexity=self.model_complexity,
            min_detection_confidence=self.min_detection_confidence,
        ) as model:
            for t, frame in enumerate(frames):
                result = model.process(np.ascontiguousarray(frame))
                if result.pose_landmarks is not None:
                    keypoints[t] = coco_from_mediapipe(result.pose_landmarks.landmark)
                    detected[t] = True
                if result.face_landmarks is not None:
                    mouth[t] = mouth_opening(result.face_landmarks.landmark)
                hands.append(
                    [_hand(result.left_hand_landmarks), _hand(result.right_hand_landmarks)]
                )
        return keypoints, detected, hands, mouth


def coco_from_mediapipe(landmarks) -> np.ndarray:
    """(17, 3) [x, y, visibility]; joints outside the frame are clipped to it, invisible."""
    out = np.zeros((NUM_JOINTS, 3), np.float32)
    for joint, index in enumerate(MEDIAPIPE_TO_COCO):
        point = landmarks[index]
        inside = 0.0 <= point.x <= 1.0 and 0.0 <= point.y <= 1.0
        out[joint] = (min(max(point.x, 0.0), 1.0), min(max(point.y, 0.0), 1.0),
                      point.visibility if inside else 0.0)  # fmt: skip
    return out


def mouth_opening(landmarks) -> float:
    """Inner-lip gap over mouth width: ~0 closed, ~0.3-0.6 wide open; scale-free."""
    gap = np.hypot(landmarks[UPPER_LIP].x - landmarks[LOWER_LIP].x,
                   landmarks[UPPER_LIP].y - landmarks[LOWER_LIP].y)  # fmt: skip
    width = np.hypot(landmarks[MOUTH_LEFT].x - landmarks[MOUTH_RIGHT].x,
                     landmarks[MOUTH_LEFT].y - landmarks[MOUTH_RIGHT].y)  # fmt: skip
    return float(gap / width) if width > 1e-6 else float("nan")


def _hand(landmarks) -> list | None:
    if landmarks is None:
        return None
    return [[round(min(max(p.x, 0.0), 1.0), 4), round(min(max(p.y, 0.0), 1.0), 4), 1.0]
            for p in landmarks.landmark]  # fmt: skip
