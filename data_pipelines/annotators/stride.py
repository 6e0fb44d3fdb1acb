"""Running a slow model on every Nth frame and filling the frames between by interpolation.

The model sees frames 0, N, 2N, ... and always the last frame (so nothing is extrapolated);
a frame between two measured ones gets the linear interpolation of their outputs, or
"missing" (no pose, a null hand, NaN) unless both of them found the thing. With N = 1 every
frame is measured and the outputs pass through untouched. The method string gains
``/every_N`` (e.g. ``mediapipe_holistic_1/every_2``) when N > 1.
"""

from __future__ import annotations

import numbers

import numpy as np


def check_every_n_frames(option: str, value: object) -> int:
    """``value`` as a stride >= 1, or a ValueError naming ``option`` and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"{option}={value!r} must be a whole number >= 1: 1 runs the model on every frame, "
            "N on every Nth frame (and the last) with the frames between interpolated"
        )
    return int(value)


def with_stride(method: str, every_n_frames: int) -> str:
    """The method name as recorded in quality.methods: ``METHOD`` or ``METHOD/every_N``."""
    return method if every_n_frames == 1 else f"{method}/every_{every_n_frames}"


def measured_frames(num_frames: int, every_n_frames: int) -> np.ndarray:
    """Indices the model runs on: 0, N, 2N, ... and the last frame, ascending."""
    if num_frames < 1:
        return np.zeros(0, np.int64)
    indices = np.arange(0, num_frames, every_n_frames)
    if indices[-1] != num_frames - 1:
        indices = np.append(indices, num_frames - 1)
    return indices


def _neighbours(indices: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames between measured ones, position in ``indices`` of the measured frame before
    each, its weight towards the one after in [0, 1))."""
    frames = np.arange(num_frames)
    between = frames[~np.isin(frames, indices)]
    before = np.searchsorted(indices, between, side="right") - 1
    weight = (between - indices[before]) / (indices[before + 1] - indices[before])
    return between, before, weight


def interpolate(
    values: np.ndarray, indices: np.ndarray, num_frames: int, present: np.ndarray, missing: float
) -> np.ndarray:
    """(num_frames, ...) from ``values`` (K, ...) measured at ``indices``: measured frames as
    they are; a frame between two measured ones linearly interpolated (in float64, then the
    dtype of ``values``) where ``present`` is true for both, else filled with ``missing``."""
    if len(indices) == num_frames:
        return values
    out = np.empty((num_frames, *values.shape[1:]), values.dtype)
    out[indices] = values
    between, before, weight = _neighbours(indices, num_frames)
    weight = weight.reshape(-1, *([1] * (values.ndim - 1)))
    low, high = values[before].astype(np.float64), values[before + 1].astype(np.float64)
    out[between] = (low + (high - low) * weight).astype(values.dtype)
    out[between[~(present[before] & present[before + 1])]] = missing
    return out


def _lerp_rows(low: list, high: list, weight: float, digits: int) -> list[list[float]]:
    return [[round(a + (b - a) * weight, digits) for a, b in zip(one, two, strict=True)]
            for one, two in zip(low, high, strict=True)]  # fmt: skip


def _spread(per_measured: list, indices: np.ndarray, num_frames: int) -> list:
    out: list = [None] * num_frames
    for k, t in enumerate(indices):
        out[t] = per_measured[k]
    return out


def interpolate_points(
    points: list, indices: np.ndarray, num_frames: int, digits: int
) -> list[list[list[float]] | None]:
    """Per measured frame a list of [x, y, ...] points or None (e.g. a hand not found) ->
    one entry per frame; between two measured frames interpolated and rounded to ``digits``
    where both have the points, else None."""
    if len(indices) == num_frames:
        return points
    out = _spread(points, indices, num_frames)
    for t, k, weight in zip(*_neighbours(indices, num_frames), strict=True):
        low, high = points[k], points[k + 1]
        if low is not None and high is not None:
            out[t] = _lerp_rows(low, high, float(weight), digits)
    return out


def interpolate_boxes(boxes: list, indices: np.ndarray, num_frames: int, digits: int) -> list:
    """Per-frame lists of boxes ([x, y, w, h, score], sorted) measured at ``indices`` -> one
    list per frame. Between two measured frames with the same number of faces the boxes are
    paired in order and interpolated (rounded to ``digits``); where the count changes, the
    frame takes the boxes of the nearer measured frame (the earlier on a tie)."""
    if len(indices) == num_frames:
        return boxes
    out = _spread(boxes, indices, num_frames)
    for t, k, weight in zip(*_neighbours(indices, num_frames), strict=True):
        low, high = boxes[k], boxes[k + 1]
        if len(low) == len(high):
            out[t] = _lerp_rows(low, high, float(weight), digits)
        else:
            out[t] = [list(box) for box in (high if weight > 0.5 else low)]
    return out
