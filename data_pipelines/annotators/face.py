"""Face detection: how many faces, how large, in how many of the measured frames.

``every_n_frames`` = N > 1 runs the detector on every Nth frame and the last (see stride.py);
the frames between get interpolated boxes, so ``faces`` always holds one list per frame.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import measures
from data_pipelines.annotations import keypoints_at
from data_pipelines.annotators.base import ClipView, Findings, warn_once
from data_pipelines.annotators.mediapipe_compat import import_mediapipe
from data_pipelines.annotators.stride import (
    check_every_n_frames,
    interpolate_boxes,
    measured_frames,
    with_stride,
)

FACE_BACKENDS = ("auto", "mediapipe", "sidecar")


class FaceDetector:
    """Scores ``face_fraction`` (measured frames with >= 1 face), ``face_count_max``,
    ``face_count_mean``, ``face_area`` (mean area of the largest face, fraction of the frame),
    all over the frames the detector ran on; field ``faces``: per frame, [x, y, w, h, score]
    boxes normalised to the frame (interpolated between measured frames, see
    stride.interpolate_boxes), and ``faces_every_n_frames``.

    With a sidecar pose and ``use_sidecar``, the face counts as present where the sidecar's
    nose and eyes are visible (no boxes). Otherwise MediaPipe face detection (full-range model
    by default, ``model_selection=0`` for faces within ~2 m). backend: auto (MediaPipe when
    installed), mediapipe (required), sidecar.
    """

    name = "face"

    def __init__(
        self,
        backend: str = "auto",
        use_sidecar: bool = True,
        model_selection: int = 1,
        min_confidence: float = 0.5,
        every_n_frames: int = 1,
    ) -> None:
        if backend not in FACE_BACKENDS:
            raise ValueError(f"annotators.face.backend={backend!r}: use one of {FACE_BACKENDS}")
        self.every_n_frames = check_every_n_frames("annotators.face.every_n_frames", every_n_frames)
        self.use_sidecar = use_sidecar or backend == "sidecar"
        self.model_selection, self.min_confidence = model_selection, min_confidence
        self._mp = None
        if backend != "sidecar":
            self._mp = import_mediapipe("face backend=mediapipe", backend == "mediapipe")
            if self._mp is None:
                warn_once("mediapipe is not installed: faces are only seen through sidecar poses")
        self.resolved = "sidecar" if self._mp is None else "sidecar+mediapipe"
        if not self.use_sidecar:
            self.resolved = "mediapipe"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        if self.use_sidecar and clip.sidecar_pose is not None:
            times = clip.start + np.arange(len(clip.frames)) / clip.fps
            heads = measures.visible_mask(keypoints_at(clip.sidecar_pose, times))
            present = heads[:, list(measures.HEAD_JOINTS)].all(axis=1)
            found.scores["face_fraction"] = float(present.mean())
            found.methods["face"] = "sidecar_keypoints"
            return
        if self._mp is None:
            return
        measured = measured_frames(len(clip.frames), self.every_n_frames)
        boxes = self._detect(clip.frames[measured])
        counts = np.array([len(frame) for frame in boxes])
        largest = [max((w * h for _, _, w, h, _ in frame), default=0.0) for frame in boxes]
        found.fields["faces"] = interpolate_boxes(boxes, measured, len(clip.frames), 4)
        found.fields["faces_every_n_frames"] = self.every_n_frames
        found.scores["face_fraction"] = float((counts > 0).mean())
        found.scores["face_count_max"] = float(counts.max())
        found.scores["face_count_mean"] = float(counts.mean())
        found.scores["face_area"] = float(np.mean([a for a in largest if a > 0] or [0.0]))
        method = f"mediapipe_face_detection_{self.model_selection}"
        found.methods["face"] = with_stride(method, self.every_n_frames)

    def _detect(self, frames: np.ndarray) -> list[list[list[float]]]:
        out = []
        with self._mp.solutions.face_detection.FaceDetection(
            model_selection=self.model_selection, min_detection_confidence=self.min_confidence
        ) as model:
            for frame in frames:
                result = model.process(np.ascontiguousarray(frame))
                boxes = []
                for detection in result.detections or []:
                    box = detection.location_data.relative_bounding_box
                    x, y = max(0.0, box.xmin), max(0.0, box.ymin)
                    w = min(1.0, box.xmin + box.width) - x
                    h = min(1.0, box.ymin + box.height) - y
                    if w > 0 and h > 0:
                        boxes.append([round(v, 4) for v in (x, y, w, h, detection.score[0])])
                out.append(sorted(boxes))
        return out
