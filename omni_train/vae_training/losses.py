"""VAE training losses: L1 and SSIM reconstruction, KL of the posterior to N(0, I)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omni_train.evaluation.image import ssim_per_image
from omni_train.vae_training.config import VAELossConfig


def frames_of(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): every frame an image."""
    batch, channels, frames, height, width = video.shape
    return video.transpose(1, 2).reshape(batch * frames, channels, height, width)


def to_unit_range(video: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (a reconstruction may overshoot)."""
    return ((video + 1.0) / 2.0).clamp(0.0, 1.0)


def l1_loss(recon: Tensor, target: Tensor) -> Tensor:
    return (recon - target).abs().mean()


def ssim_loss(recon: Tensor, target: Tensor) -> Tensor:
    """1 - mean per-frame SSIM of two videos in [-1, 1] (scored in [0, 1]).

    The reconstruction is mapped, not clamped: a clamp would stop gradients at overshoot.
    """
    a = frames_of((recon + 1.0) / 2.0)
    b = frames_of((target + 1.0) / 2.0)
    return 1.0 - ssim_per_image(a, b).mean()


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


@dataclass
class VAELosses:
    total: Tensor
    l1: Tensor
    ssim: Tensor
    kl: Tensor

    def detached(self) -> VAELosses:
        return VAELosses(*(t.detach() for t in (self.total, self.l1, self.ssim, self.kl)))

    def as_tensor(self) -> Tensor:
        return torch.stack([self.total, self.l1, self.ssim, self.kl]).detach().double()


def vae_losses(
    recon: Tensor, target: Tensor, mean: Tensor, logvar: Tensor, cfg: VAELossConfig
) -> VAELosses:
    l1 = l1_loss(recon, target)
    ssim = ssim_loss(recon, target) if cfg.ssim > 0 else recon.new_zeros(())
    kl = kl_loss(mean, logvar)
    total = cfg.l1 * l1 + cfg.ssim * ssim + cfg.kl * kl
    return VAELosses(total, l1, ssim, kl)
