"""Held-out reconstruction metrics and latent statistics of a VAE, as pure functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from omni_train.data.config import DataConfig
from omni_train.evaluation.image import psnr_per_image, ssim_per_image
from omni_train.vae_training.losses import frames_of, to_unit_range

Reconstruct = Callable[[Tensor], Tensor]


def fixed_clips(data: DataConfig, shards: str, count: int, seed: int) -> list[Tensor]:
    """The first ``count`` distinct clips (each (1, 3, T, H, W) in [-1, 1]) of ``shards`` in
    shard order, windowed like training clips; fewer when the shards hold fewer."""
    from omni_train.data.stream import build_loader

    single = dataclasses.replace(
        data, shards=shards, sources=[], buckets=[], batch_size=1, shuffle_buffer=1, num_workers=0
    )
    loader = build_loader(single, rank=0, world_size=1, seed=seed)
    clips: list[Tensor] = []
    seen: set[str] = set()
    for batch in loader:
        key = batch.keys[0]
        if key in seen or len(clips) >= count:
            break
        seen.add(key)
        clips.append(batch.video)
    return clips


@torch.no_grad()
def reconstruction_scores(reconstruct: Reconstruct, clips: list[Tensor]) -> dict[str, float]:
    """Mean per-frame PSNR (dB) and SSIM of ``reconstruct(clip)`` against each clip, both
    scored on frames mapped from [-1, 1] to [0, 1] (the reconstruction clamped)."""
    psnr, ssim = [], []
    for clip in clips:
        recon = frames_of(to_unit_range(reconstruct(clip)))
        real = frames_of(to_unit_range(clip))
        psnr.append(psnr_per_image(recon, real))
        ssim.append(ssim_per_image(recon.double(), real.double()))
    return {
        "val/psnr": float(torch.cat(psnr).mean()),
        "val/ssim": float(torch.cat(ssim).mean()),
        "val/frames": sum(int(p.numel()) for p in psnr),
    }


@torch.no_grad()
def latent_normalisation(posterior_means: list[Tensor]) -> tuple[float, float]:
    """(shift, scale) making the posterior means zero-mean, unit-std: z = (mean - shift) * scale."""
    values = torch.cat([m.double().flatten() for m in posterior_means])
    std = float(values.std())
    return float(values.mean()), 1.0 / max(std, 1e-6)
