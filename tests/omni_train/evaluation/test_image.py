"""PSNR and SSIM against closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omni_train.evaluation.image import (
    SSIM_K1,
    SSIM_K2,
    psnr_per_image,
    ssim_per_image,
    video_psnr,
    video_ssim,
)


def test_psnr_of_a_known_error():
    a = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.1, dtype=torch.float64)  # MSE 0.01 -> 20 dB
    assert float(psnr_per_image(a, b)) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(float(psnr_per_image(a, a)))
    # The same error on a 0..255 scale: MSE 25.5^2 against a peak of 255 is 20 dB too.
    assert float(psnr_per_image(a, b * 255, data_range=255.0)) == pytest.approx(20.0, abs=1e-9)


def test_video_psnr_pools_the_error_over_frames():
    real = np.zeros((2, 16, 16, 3), np.uint8)
    video = real.copy()
    video[1] = 51  # frame MSEs 0 and 0.04 -> pooled 0.02 -> 16.99 dB
    assert video_psnr(video, real) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-9)


def test_ssim_of_constant_images_is_the_luminance_term():
    # Constant images have no variance, so SSIM reduces to (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2 = 0.2, 0.6
    a = torch.full((1, 1, 20, 20), m1, dtype=torch.float64)
    b = torch.full((1, 1, 20, 20), m2, dtype=torch.float64)
    c1 = SSIM_K1**2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert float(ssim_per_image(a.double(), b.double())) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_a_constant_shift_is_the_mean_luminance_term():
    # y = x + c keeps every window's variance and covariance, so the structure term is 1 and
    # SSIM is the window-averaged luminance term; with a constant x it is one closed form.
    x = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    c1 = SSIM_K1**2
    m1, m2 = 0.3, 0.5
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert float(ssim_per_image(x, x + 0.2)) == pytest.approx(expected, rel=1e-9)
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 1, 32, 32, generator=generator, dtype=torch.float64)
    assert float(ssim_per_image(base, base)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim_per_image(base, 1.0 - base)) < 0  # anti-correlated structure
    assert SSIM_K2 == 0.03


def test_video_ssim_is_the_mean_over_frames():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    video = real.copy()
    video[2] = 255 - real[2]
    per_frame = [video_ssim(video[i : i + 1], real[i : i + 1]) for i in range(3)]
    assert per_frame[0] == pytest.approx(1.0)
    assert video_ssim(video, real) == pytest.approx(sum(per_frame) / 3, abs=1e-12)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\) and \(1, 3, 8, 8\)"):
        psnr_per_image(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8))
