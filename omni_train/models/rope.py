"""3D rotary position embedding over integer (t, h, w) token positions.

Each head's channels are split into three contiguous parts, one per axis (``rope_axes``);
within a part, consecutive channel pairs are rotated by position * frequency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def validate_rope_axes(axes: Sequence[int], head_dim: int) -> None:
    if len(axes) != 3:
        raise ValueError(f"dit.rope_axes={list(axes)} must have 3 entries, for (t, h, w)")
    if any(a <= 0 or a % 2 for a in axes):
        raise ValueError(f"dit.rope_axes={list(axes)}: every entry must be positive and even")
    if sum(axes) != head_dim:
        raise ValueError(
            f"dit.rope_axes={list(axes)} sums to {sum(axes)} but the head dim is {head_dim} "
            "(hidden_size / num_heads); make them equal"
        )


def grid_positions(frames: int, height: int, width: int, t_offset: int = 0) -> torch.Tensor:
    """(frames*height*width, 3) integer (t, h, w) positions in frame-major raster order."""
    t = torch.arange(frames) + t_offset
    h = torch.arange(height)
    w = torch.arange(width)
    grid = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def rope_angles(positions: torch.Tensor, axes: Sequence[int], theta: float) -> torch.Tensor:
    """(..., 3) positions -> (..., head_dim / 2) rotation angles."""
    parts = []
    for axis, dim in enumerate(axes):
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        freqs = theta**-exponents
        parts.append(positions[..., axis, None].to(torch.float64) * freqs.to(positions.device))
    return torch.cat(parts, dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, axes: Sequence[int], theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = rope_angles(positions, axes, theta)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, tokens, head_dim) by (tokens, head_dim/2) cos/sin tables."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)
