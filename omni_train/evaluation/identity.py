"""Identity: how close every sampled frame's face is to the reference face, and its drift.

Per sampled frame, the distance of its face embedding to the reference's (dlib: Euclidean on
128-d descriptors, same person below 0.6; ArcFace: 1 - cosine). Frames without a detected
face are skipped and counted (``identity_face_fraction``), never scored. Reported:
- ``identity_distance``: mean distance over frames with a face (lower is better);
- ``identity_face_fraction``: sampled frames with a face / sampled frames;
- ``identity_drift``: mean distance over the last quarter of the scored frames minus that over
  the first quarter (time order; > 0 = the face moves away from the reference over time).
Frames are sampled evenly, at most ``MetricsConfig.identity_frames`` per video (each dlib
embedding costs ~0.1-0.2 s on one CPU core); the reference's embedding is computed once per
clip and shared by all candidates.
"""

from __future__ import annotations

import numpy as np

from omni_train.evaluation.faces import (
    FaceToolsMissing,
    ReferenceEmbeddings,
    build_embedder,
    sample_indices,
    unavailable,
)
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import MetricsConfig

MIN_DRIFT_FRAMES = 4


def quarter_drift(values: np.ndarray) -> float | None:
    """Mean of the last quarter minus mean of the first quarter (at least one value each)."""
    if len(values) < MIN_DRIFT_FRAMES:
        return None
    quarter = len(values) // 4
    return float(np.mean(values[-quarter:]) - np.mean(values[:quarter]))


class IdentityMetric:
    name = "identity"

    def __init__(self, cfg: MetricsConfig | None = None) -> None:
        self.cfg = cfg or MetricsConfig()
        self.reason: str | None = None
        self.method = f"identity embedder {self.cfg.identity}"
        try:
            self.embedder = build_embedder(self.cfg.identity, self.cfg.identity_weights)
            self.method = self.embedder.method
            self.reference = ReferenceEmbeddings(self.embedder)
        except FaceToolsMissing as err:
            self.embedder, self.reason = None, str(err)

    def _keys(self, stride_note: str) -> dict[str, tuple[str, bool]]:
        method = f"{self.method}; {stride_note}"
        return {
            "identity_distance": (f"mean per-frame distance to the reference face; {method}",
                                  False),
            "identity_face_fraction": (f"sampled frames with a detected face; {method}", True),
            "identity_drift": (f"last-quarter minus first-quarter mean distance; {method}",
                               False),
        }  # fmt: skip

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        indices = sample_indices(len(video), self.cfg.identity_frames)
        keys = self._keys(f"{len(indices)} of {len(video)} frames sampled evenly")
        if self.embedder is None:
            return unavailable(keys, self.reason or "no embedder")
        reference = self.reference(clip.key, clip.reference)
        if reference is None:
            return unavailable(keys, "no face detected in the reference image")
        distances = []
        for t in indices:
            embedding = self.embedder.embed(video[t])
            if embedding is not None:
                distances.append(self.embedder.distance(embedding, reference))
        values = np.asarray(distances, dtype=np.float64)
        (dist_method, _), (frac_method, _), (drift_method, _) = keys.values()
        out = {
            "identity_face_fraction": MetricValue(len(values) / max(1, len(indices)), frac_method)
        }
        if len(values) == 0:
            reason = f"no face detected in any of the {len(indices)} sampled frames"
            out["identity_distance"] = MetricValue.missing(dist_method, reason, False)
            out["identity_drift"] = MetricValue.missing(drift_method, reason, False)
            return out
        out["identity_distance"] = MetricValue(
            float(values.mean()), dist_method, higher_is_better=False, series=values.tolist()
        )
        drift = quarter_drift(values)
        out["identity_drift"] = (
            MetricValue(drift, drift_method, higher_is_better=False)
            if drift is not None
            else MetricValue.missing(
                drift_method,
                f"{len(values)} frames with a face; drift needs {MIN_DRIFT_FRAMES}",
                False,
            )
        )
        return out
