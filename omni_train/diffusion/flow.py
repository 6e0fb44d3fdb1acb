"""Rectified-flow objective: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0.

t = 0 is data and t = 1 is pure noise. Leading "motion" latent frames (the clean end of the
previous segment, paper §3.4) are given clean and left out of the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omni_train.diffusion.config import TIMESTEP_SAMPLINGS, DiffusionConfig

# Keeps sampled t strictly inside (0, 1) in float32.
_T_EPS = 1e-5


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 shift s t / (1 + (s - 1) t): s > 1 spends more time near noise."""
    if shift <= 0:
        raise ValueError(f"diffusion.shift={shift} must be positive")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    cfg: DiffusionConfig,
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) training timesteps in (0, 1), drawn on the generator's device then moved."""
    draw_device = generator.device if generator is not None else "cpu"
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device)
    elif cfg.timestep_sampling == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=draw_device)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    else:
        raise ValueError(
            f"diffusion.timestep_sampling={cfg.timestep_sampling!r} not in {TIMESTEP_SAMPLINGS}"
        )
    t = shift_timesteps(t, cfg.shift).clamp(_T_EPS, 1 - _T_EPS)
    return t.to(device) if device is not None else t


def noisy_latents(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_motion_latents: int = 0
) -> torch.Tensor:
    """(B, C, L, h, w) interpolation at t, with the first motion frames left clean."""
    t_b = t.to(x0.dtype).view(-1, 1, 1, 1, 1)
    x_t = (1 - t_b) * x0 + t_b * noise
    if num_motion_latents:
        x_t = torch.cat([x0[:, :, :num_motion_latents], x_t[:, :, num_motion_latents:]], dim=2)
    return x_t


def flow_matching_loss(
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    num_motion_latents: int = 0,
    **cond: object,
) -> torch.Tensor:
    """Per-sample mean squared velocity error (B,) over the generated (non-motion) frames.

    ``model_fn(x_t, t, num_motion_latents=..., **cond)`` returns a velocity shaped like x0.
    """
    frames = x0.shape[2]
    if not 0 <= num_motion_latents < frames:
        raise ValueError(f"num_motion_latents={num_motion_latents} not in [0, {frames})")
    x_t = noisy_latents(x0, noise, t, num_motion_latents)
    prediction = model_fn(x_t, t, num_motion_latents=num_motion_latents, **cond)
    target = noise - x0
    error = (prediction.float() - target.float())[:, :, num_motion_latents:]
    return error.square().flatten(1).mean(dim=1)
