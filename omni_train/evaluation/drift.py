"""Long-video drift: per generated segment, how far identity and colours are from the reference.

The paper's 30-second reference-ratio ablation watches a long generation (many segments, each
conditioned on the previous one's last frames) lose the reference's identity and colours.
Per segment of ``ClipInputs.segments`` (pixel frames [start, end); a clip without segments is
cut into ``drift_segment_seconds`` pieces):
- identity distance: mean distance to the reference face (identity.py's embedder and
  convention) over ``drift_frames_per_segment`` frames spread evenly in the segment, frames
  without a face skipped; a segment without any face has no value (None in the series);
- colour distance: total-variation distance 0.5 * sum |p - q| between the segment's pooled
  per-channel RGB histograms (``drift_color_bins`` bins) and the reference's, averaged over
  the three channels: 0 = the same colours, 1 = no colour in common.
Each drift key's ``series`` holds the per-segment values; its value is the last segment's minus
the first segment's (both with a value), so > 0 means the segment drifted away from the
reference. ``color_distance`` is the level rather than the change: the colour distance of the
whole generation's pooled histograms to the reference's (how far its appearance is from the
reference at all, lower is better).
"""

from __future__ import annotations

import numpy as np

from omni_train.evaluation.faces import (
    FaceToolsMissing,
    ReferenceEmbeddings,
    build_embedder,
    sample_indices,
)
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import MetricsConfig


def color_histograms(frames: np.ndarray, bins: int) -> np.ndarray:
    """(3, bins) per-channel histograms of (..., 3) uint8 pixels, each summing to 1."""
    pixels = frames.reshape(-1, 3)
    edges = np.linspace(0, 256, bins + 1)
    counts = np.stack([np.histogram(pixels[:, c], edges)[0] for c in range(3)]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


def color_distance(frames: np.ndarray, reference: np.ndarray, bins: int) -> float:
    """Mean over RGB channels of the total-variation distance of the two histograms."""
    p, q = color_histograms(frames, bins), color_histograms(reference, bins)
    return float(0.5 * np.abs(p - q).sum(axis=1).mean())


def segments_of(clip: ClipInputs, length: int, seconds: float) -> list[tuple[int, int]]:
    """The clip's generated segments within the video, else pieces of ``seconds``."""
    if clip.segments:
        spans = [(max(0, s), min(length, e)) for s, e in clip.segments]
        return [(s, e) for s, e in spans if e > s]
    step = max(1, round(seconds * clip.fps))
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def first_to_last(series: list[float | None]) -> float | None:
    values = [v for v in series if v is not None]
    return values[-1] - values[0] if len(values) >= 2 else None


class DriftMetric:
    name = "drift"
    # Scores the whole generation (every segment), not only its overlap with the real clip.
    whole_generation = True

    def __init__(self, cfg: MetricsConfig | None = None) -> None:
        self.cfg = cfg or MetricsConfig()
        self.identity_reason = None
        self.identity_method = f"identity embedder {self.cfg.identity}"
        try:
            self.embedder = build_embedder(self.cfg.identity, self.cfg.identity_weights)
            self.identity_method = self.embedder.method
            self.reference = ReferenceEmbeddings(self.embedder)
        except FaceToolsMissing as err:
            self.embedder, self.identity_reason = None, str(err)

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        spans = segments_of(clip, len(video), self.cfg.drift_segment_seconds)
        where = "the clip's segments" if clip.segments else (
            f"{self.cfg.drift_segment_seconds} s pieces (the clip gives no segments)")  # fmt: skip
        bins = self.cfg.drift_color_bins
        colors = [color_distance(video[s:e], clip.reference, bins) for s, e in spans]
        color_method = (f"last minus first segment of the RGB histogram distance to the "
                        f"reference ({bins} bins per channel, total variation, mean over "
                        f"channels), per segment over {where}")  # fmt: skip
        level_method = (f"RGB histogram distance of all frames pooled to the reference ({bins} "
                        "bins per channel, total variation, mean over channels)")  # fmt: skip
        return {
            "drift_identity": self._identity(video, clip, spans, where),
            "drift_color": _drift_value(colors, color_method),
            "color_distance": MetricValue(
                color_distance(video, clip.reference, bins), level_method, higher_is_better=False
            ),
        }

    def _identity(
        self, video: np.ndarray, clip: ClipInputs, spans: list[tuple[int, int]], where: str
    ) -> MetricValue:
        per = self.cfg.drift_frames_per_segment
        method = (f"last minus first segment of the mean distance to the reference face "
                  f"({per} frames per segment, frames without a face skipped), per segment "
                  f"over {where}; {self.identity_method}")  # fmt: skip
        if self.embedder is None:
            return MetricValue.missing(method, self.identity_reason, False)
        reference = self.reference(clip.key, clip.reference)
        if reference is None:
            return MetricValue.missing(method, "no face detected in the reference image", False)
        series: list[float | None] = []
        for start, end in spans:
            distances = [
                self.embedder.distance(found, reference)
                for t in start + sample_indices(end - start, per)
                if (found := self.embedder.embed(video[t])) is not None
            ]
            series.append(float(np.mean(distances)) if distances else None)
        return _drift_value(series, method)


def _drift_value(series: list[float | None], method: str) -> MetricValue:
    drift = first_to_last(series)
    reason = None
    if drift is None:
        reason = (f"{sum(v is not None for v in series)} of {len(series)} segments have a "
                  "value; drift needs two")  # fmt: skip
    return MetricValue(drift, method, reason, higher_is_better=False, series=series)
