"""PSNR and SSIM between images or videos, as torch functions (also differentiable).

SSIM follows Wang et al. 2004 as most papers compute it: an 11 x 11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" filtering (no padding), per channel, then averaged.
Inputs are (N, C, H, W) in [0, data_range]; videos are scored frame by frame by folding time
into N.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_METHOD = "Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, valid filtering, per channel"


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_pair(a, b)
    return (a.double() - b.double()).square().flatten(1).mean(dim=1)


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) PSNR in dB; identical images give +inf."""
    mse = mse_per_image(a, b)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """Valid 11 x 11 Gaussian filtering per channel, as two 1-D passes (the window is
    separable, so this equals the 2-D filter at a fraction of the cost)."""
    channels = x.shape[1]
    taps = _gaussian_taps(x.dtype, x.device)
    rows = taps.view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1)
    cols = taps.view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW)
    return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N,) mean SSIM of each image pair. Images must be at least 11 x 11."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    # One filtering pass over the five maps the statistics need.
    stats = _gaussian_blur(torch.cat([a, b, a * a, b * b, a * b], dim=1))
    mu_a, mu_b, aa, bb, ab = stats.chunk(5, dim=1)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * structure).flatten(1).mean(dim=1)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float64 in [0, 1]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0


def video_psnr(video: np.ndarray, real: np.ndarray) -> float:
    """PSNR (dB) of two uint8 videos over all their pixels (MSE pooled over frames)."""
    a, b = frames_to_tensor(video), frames_to_tensor(real)
    return psnr_from_mse(float(mse_per_image(a, b).mean()))


def video_ssim(video: np.ndarray, real: np.ndarray) -> float:
    """Mean per-frame SSIM of two uint8 videos (float32 filtering: ~1e-6 of float64)."""
    a, b = frames_to_tensor(video).float(), frames_to_tensor(real).float()
    return float(ssim_per_image(a, b).double().mean())
