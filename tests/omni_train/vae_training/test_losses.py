"""Known answers for the VAE losses, the image phase's frame draw and the latent statistics."""

from __future__ import annotations

import math

import pytest
import torch

from omni_train.vae_training.config import VAELossConfig
from omni_train.vae_training.losses import kl_loss, l1_loss, ssim_loss, vae_losses
from omni_train.vae_training.metrics import latent_normalisation
from omni_train.vae_training.trainer import frames_as_images


def test_kl_of_known_gaussians():
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element.
    mean = torch.tensor([0.0, 1.0, -2.0, 0.0])
    logvar = torch.tensor([0.0, 0.0, 0.0, math.log(2.0)])
    per_element = [0.0, 0.5, 2.0, (2.0 - 1.0 - math.log(2.0)) / 2]
    assert kl_loss(mean, logvar).item() == pytest.approx(sum(per_element) / 4, rel=1e-6)


def test_kl_of_the_prior_itself_is_zero():
    assert kl_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)).item() == 0.0


def test_l1_of_known_tensors():
    recon = torch.tensor([0.5, -0.5, 1.0, 0.0])
    target = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert l1_loss(recon, target).item() == pytest.approx(0.5)


def test_ssim_loss_is_zero_for_a_perfect_reconstruction_and_one_minus_ssim_otherwise():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 2, 16, 16, generator=generator) * 2 - 1
    assert ssim_loss(video, video).item() == pytest.approx(0.0, abs=1e-6)
    # A constant frame against another constant: structure term 1, luminance term known.
    a = torch.full((1, 3, 1, 16, 16), 0.0)  # 0.5 in [0, 1]
    b = torch.full((1, 3, 1, 16, 16), -1.0)  # 0.0 in [0, 1]
    c1 = 0.01**2
    expected = 1.0 - c1 / (0.25 + c1)
    assert ssim_loss(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_total_is_the_weighted_sum():
    recon = torch.zeros(1, 3, 1, 16, 16)
    target = torch.full((1, 3, 1, 16, 16), 0.5)
    mean, logvar = torch.ones(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 2)
    cfg = VAELossConfig(l1=2.0, ssim=3.0, kl=0.1)
    losses = vae_losses(recon, target, mean, logvar, cfg)
    assert losses.l1.item() == pytest.approx(0.5)
    assert losses.kl.item() == pytest.approx(0.5)
    expected = 2.0 * 0.5 + 3.0 * losses.ssim.item() + 0.1 * 0.5
    assert losses.total.item() == pytest.approx(expected, rel=1e-6)
    assert losses.ssim.item() > 0


def test_frames_as_images_draws_frames_of_each_clip():
    video = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 1, 5, 1, 1)
    video = video.expand(2, 3, 5, 8, 8)
    images = frames_as_images(video, 3, torch.Generator().manual_seed(0))
    assert images.shape == (6, 3, 1, 8, 8)
    values = images[:, 0, 0, 0, 0].tolist()
    assert all(0 <= v < 5 for v in values[:3]) and all(5 <= v < 10 for v in values[3:])
    again = frames_as_images(video, 3, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_latent_normalisation_of_known_values():
    shift, scale = latent_normalisation([torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])])
    assert shift == pytest.approx(4.0)
    assert scale == pytest.approx(1.0 / math.sqrt(20.0 / 3.0))  # unbiased std of 1,3,5,7
