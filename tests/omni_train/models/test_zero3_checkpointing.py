"""Per-block activation checkpointing under DeepSpeed ZeRO-3 on 2 forked CPU ranks: the
blocks are recomputed in backward, parameters stay partitioned, and training follows the same
losses as without checkpointing."""

from __future__ import annotations

import dataclasses

import pytest

from omni_train.testing import run_ranks

pytestmark = pytest.mark.slow

STEPS = 3


def _batch(cfg, rank: int) -> dict:
    """The same batch every step, so a falling loss shows the weights being trained."""
    import torch

    gen = torch.Generator().manual_seed(1000 * rank)
    batch, frames, latent, pixel_frames = 2, 3, 4, 9
    channels = cfg.vae.latent_channels
    return dict(
        target=torch.randn(batch, channels, frames, latent, latent, generator=gen),
        noisy=torch.randn(batch, channels, frames, latent, latent, generator=gen),
        timesteps=torch.rand(batch, generator=gen),
        text=torch.randn(batch, 5, cfg.text_encoder.d_model, generator=gen),
        text_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
        ref_latents=torch.randn(batch, channels, 1, latent, latent, generator=gen),
        audio_features=torch.randn(
            batch, pixel_frames, cfg.audio_encoder.feature_dim, generator=gen
        ),
        pose_heatmaps=torch.rand(
            batch,
            cfg.pose_guider.num_keypoints,
            pixel_frames,
            8 * latent,
            8 * latent,
            generator=gen,
        ),
        active={c: torch.tensor([True, rank == 0]) for c in ("text", "ref", "audio", "pose")},
    )


def _train_zero3(checkpointing: bool) -> dict:
    import deepspeed
    import torch

    from omni_train.models.config import ModelConfig
    from omni_train.models.denoiser import build_denoiser

    cfg = ModelConfig()
    cfg = dataclasses.replace(
        cfg, dit=dataclasses.replace(cfg.dit, gradient_checkpointing=checkpointing)
    )
    torch.manual_seed(0)
    model = build_denoiser(cfg)
    block_calls = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda *_: block_calls.append(1))
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    rank = torch.distributed.get_rank()
    losses, calls_per_step = [], []
    for _ in range(STEPS):
        block_calls.clear()
        engine.train()
        batch = _batch(cfg, rank)
        target = batch.pop("target")
        loss = (engine(**batch) - target).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        calls_per_step.append(len(block_calls))
    partitioned = all(p.numel() == 0 for p in engine.module.backbone.parameters())
    engine.destroy()
    return {"losses": losses, "block_calls": calls_per_step, "partitioned": partitioned}


def _rank(_unused: int) -> dict:
    from omni_train.trainer.distributed import init_distributed

    init_distributed("gloo", timeout_minutes=5, cpu_shm_comm=False)
    import torch.distributed as dist

    results = {"plain": _train_zero3(False), "checkpointed": _train_zero3(True)}
    dist.destroy_process_group()
    return results


def test_checkpointed_blocks_train_under_zero3_like_plain_ones():
    results = run_ranks(_rank, 2, 0)
    depth = 2
    for rank_result in results:
        plain, checkpointed = rank_result["plain"], rank_result["checkpointed"]
        assert plain["partitioned"] and checkpointed["partitioned"]
        assert plain["block_calls"] == [depth] * STEPS
        assert checkpointed["block_calls"] == [2 * depth] * STEPS  # forward + recompute
        assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-7)
        assert plain["losses"][-1] < plain["losses"][0]  # the steps really train the weights
