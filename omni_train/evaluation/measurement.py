"""The shared shapes of evaluation: what a metric is given and what it returns.

A *clip metric* scores one candidate video of a held-out clip (the generated one, or a
baseline such as the real clip itself or the reference frame repeated) against what that clip
provides. A *set metric* compares a whole set of candidate videos with the set of real ones
(FID, FVD). Both return ``{key: MetricValue}``; a value that could not be measured is ``None``
with a ``reason``, so a report never shows a silent zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class MetricValue:
    # None when not measured; ``reason`` then says why (no weights, no face, ...).
    value: float | None
    # How the value was measured: model, weights, preprocessing; enough to reproduce it.
    method: str
    reason: str | None = None
    # Whether larger is better (for reports and "between the baselines" readings).
    higher_is_better: bool = True
    # Optional per-step values behind ``value`` (e.g. one per generated segment for drift);
    # a step that could not be measured (a segment without a face) is None.
    series: list[float | None] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def missing(method: str, reason: str, higher_is_better: bool = True) -> MetricValue:
        return MetricValue(None, method, reason, higher_is_better)


@dataclass
class ClipInputs:
    """What a held-out clip offers every candidate video scored against it."""

    key: str
    # (T, H, W, 3) uint8 RGB: the real clip, at the resolution the candidates have.
    real: np.ndarray
    # (H, W, 3) uint8 RGB: the frame the model was given as its reference image.
    reference: np.ndarray
    fps: float
    # 16 kHz mono float32 in [-1, 1] covering the clip, or None when the clip has no audio.
    audio: np.ndarray | None = None
    audio_rate: int = 16_000
    # Pixel-frame [start, end) of each generated segment (long-video drift per segment).
    segments: list[tuple[int, int]] = field(default_factory=list)


class ClipMetric(Protocol):
    """Scores one candidate video ((T, H, W, 3) uint8 RGB) of one clip."""

    name: str

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]: ...


class SetMetric(Protocol):
    """Compares candidate videos with the real ones, over the whole evaluated set."""

    name: str

    def __call__(
        self, videos: list[np.ndarray], reals: list[np.ndarray], fps: float
    ) -> dict[str, MetricValue]: ...
