"""Anti-aliased numpy drawing primitives and smooth textures for synthetic frames.

Each primitive works inside its own bounding box, so drawing a figure costs a few thousand
pixel operations per shape, not a full-frame pass.
"""

from __future__ import annotations

import numpy as np

Color = tuple[float, float, float]


class Canvas:
    """An (H, W, 3) float32 RGB image (0-255) with filled, anti-aliased shapes."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image.astype(np.float32, copy=True)
        self.height, self.width = image.shape[:2]

    def _box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
        left, top = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        right = min(int(np.ceil(x1)) + 2, self.width)
        bottom = min(int(np.ceil(y1)) + 2, self.height)
        if left >= right or top >= bottom:
            return None
        return slice(top, bottom), slice(left, right)

    def _blend(self, rows: slice, cols: slice, coverage: np.ndarray, color: Color) -> None:
        alpha = np.clip(coverage, 0.0, 1.0)[..., None]
        patch = self.image[rows, cols]
        patch += alpha * (np.asarray(color, np.float32) - patch)

    def _grid(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        ys = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5
        return xs, ys

    def capsule(self, p0: np.ndarray, p1: np.ndarray, radius: float, color: Color) -> None:
        """A thick line segment with round ends (a limb)."""
        box = self._box(
            min(p0[0], p1[0]) - radius,
            min(p0[1], p1[1]) - radius,
            max(p0[0], p1[0]) + radius,
            max(p0[1], p1[1]) + radius,
        )
        if box is None:
            return
        xs, ys = self._grid(*box)
        seg = p1 - p0
        length_sq = max(float(seg @ seg), 1e-6)
        along = np.clip(((xs - p0[0]) * seg[0] + (ys - p0[1]) * seg[1]) / length_sq, 0.0, 1.0)
        dist = np.hypot(xs - (p0[0] + along * seg[0]), ys - (p0[1] + along * seg[1]))
        self._blend(*box, radius + 0.5 - dist, color)

    def ellipse(self, center: np.ndarray, rx: float, ry: float, color: Color) -> None:
        box = self._box(center[0] - rx, center[1] - ry, center[0] + rx, center[1] + ry)
        if box is None:
            return
        xs, ys = self._grid(*box)
        norm = np.hypot((xs - center[0]) / max(rx, 1e-3), (ys - center[1]) / max(ry, 1e-3))
        self._blend(*box, (1.0 - norm) * min(rx, ry) + 0.5, color)

    def convex_polygon(self, points: np.ndarray, color: Color) -> None:
        """A filled convex polygon given by its corners in order (either winding)."""
        box = self._box(*points.min(axis=0), *points.max(axis=0))
        if box is None:
            return
        xs, ys = self._grid(*box)
        area2 = np.cross(points[1] - points[0], points[2] - points[0])
        sign = 1.0 if area2 >= 0 else -1.0
        inside = np.full(np.broadcast(xs, ys).shape, np.inf, np.float32)
        for a, b in zip(points, np.roll(points, -1, axis=0), strict=True):
            edge = b - a
            # Signed distance to the edge line, positive inside.
            dist = sign * (edge[0] * (ys - a[1]) - edge[1] * (xs - a[0])) / np.hypot(*edge)
            inside = np.minimum(inside, dist)
        self._blend(*box, inside + 0.5, color)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(height, width) values in [0, 1]: a random lattice of ~cells per side, bilinearly
    interpolated, so the texture varies smoothly."""
    grid_h = max(2, round(cells * height / max(height, width))) + 1
    grid_w = max(2, round(cells * width / max(height, width))) + 1
    lattice = rng.random((grid_h, grid_w), dtype=np.float32)
    ys = np.linspace(0, grid_h - 1, height, dtype=np.float32)
    xs = np.linspace(0, grid_w - 1, width, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), grid_h - 2)
    x0 = np.minimum(xs.astype(int), grid_w - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    # Smoothstep weights hide the lattice seams.
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bottom = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of an (H, W, C) float image with edge padding (soft focus)."""
    if radius <= 0:
        return image
    size = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius + 1, radius)
        padded = np.cumsum(np.pad(image, pad, mode="edge"), axis=axis, dtype=np.float32)
        upper = np.take(padded, np.arange(size, padded.shape[axis]), axis=axis)
        lower = np.take(padded, np.arange(0, padded.shape[axis] - size), axis=axis)
        image = (upper - lower) / size
    return image
