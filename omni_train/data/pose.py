"""Render keypoints (normalised [x, y, visibility]) as Gaussian heatmaps for the pose guider."""

from __future__ import annotations

import torch


def keypoint_heatmaps(
    keypoints: torch.Tensor, height: int, width: int, sigma: float
) -> torch.Tensor:
    """(..., J, 3) keypoints -> (..., J, height, width) heatmaps in [0, 1].

    x, y are normalised to the frame ([0, 1] spans the image edges); a joint with
    visibility 0 renders as an all-zero map. ``sigma`` is in output pixels.
    """
    if sigma <= 0:
        raise ValueError(f"pose sigma={sigma} must be positive (data.pose_sigma)")
    dtype, device = keypoints.dtype, keypoints.device
    # Pixel centres in the same continuous coordinates as x * width, y * height.
    xs = torch.arange(width, dtype=dtype, device=device) + 0.5
    ys = torch.arange(height, dtype=dtype, device=device) + 0.5
    px = (keypoints[..., 0] * width)[..., None, None]
    py = (keypoints[..., 1] * height)[..., None, None]
    dist2 = (xs - px) ** 2 + (ys[:, None] - py) ** 2
    visible = (keypoints[..., 2] > 0).to(dtype)[..., None, None]
    return torch.exp(-dist2 / (2 * sigma**2)) * visible
