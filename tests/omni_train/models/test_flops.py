import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omni_train.models.config import DiTConfig, ModelConfig, PoseGuiderConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.flops import (
    flop_breakdown,
    forward_flops_per_sample,
    token_counts,
    train_flops_per_sample,
)

TEXT_TOKENS = 6


def attention_heavy_config() -> ModelConfig:
    """Patch 1 and a near-empty pose guider: the transformer's attention dominates the count."""
    return ModelConfig(
        dit=DiTConfig(hidden_size=32, depth=3, num_heads=2, patch_size=1, rope_axes=[4, 6, 6]),
        pose_guider=PoseGuiderConfig(num_keypoints=2, hidden_channels=2, out_channels=2),
    )


def counted_by_torch(cfg: ModelConfig, batch: int, height: int, frames: int):
    """FLOPs torch counts for one forward and one forward + backward, per sample."""
    torch.manual_seed(0)
    model = build_denoiser(cfg)
    latent_frames, latent = 1 + (frames - 1) // 4, height // 8
    inputs = dict(
        noisy=torch.randn(batch, cfg.vae.latent_channels, latent_frames, latent, latent),
        timesteps=torch.rand(batch),
        text=torch.randn(batch, TEXT_TOKENS, cfg.text_encoder.d_model),
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        ref_latents=torch.randn(batch, cfg.vae.latent_channels, 1, latent, latent),
        audio_features=torch.randn(batch, frames, cfg.audio_encoder.feature_dim),
        pose_heatmaps=torch.rand(batch, cfg.pose_guider.num_keypoints, frames, height, height),
        active={c: torch.ones(batch, dtype=torch.bool) for c in ("text", "ref", "audio", "pose")},
    )
    # The math kernel runs attention as matmuls, which the counter sees (the fused CPU
    # kernel is not in its table).
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            model(**inputs)
        with FlopCounterMode(display=False) as train:
            model(**inputs).square().mean().backward()
    return forward.get_total_flops() / batch, train.get_total_flops() / batch


@pytest.mark.parametrize("make_cfg", [ModelConfig, attention_heavy_config])
def test_formula_matches_torch_flop_counter_within_5_percent(make_cfg):
    cfg = make_cfg()
    forward, train = counted_by_torch(cfg, batch=2, height=64, frames=17)
    assert forward_flops_per_sample(cfg, (64, 64), 17, TEXT_TOKENS) == pytest.approx(
        forward, rel=0.05
    )
    assert train_flops_per_sample(cfg, (64, 64), 17, TEXT_TOKENS) == pytest.approx(train, rel=0.05)


def test_attention_heavy_case_really_exercises_attention():
    parts = flop_breakdown(attention_heavy_config(), (64, 64), 17, TEXT_TOKENS)
    total = sum(p.train for p in parts.values())
    assert parts["joint_attention"].train > 0.3 * total


def test_training_is_about_three_forward_passes():
    cfg = ModelConfig(dit=DiTConfig(hidden_size=256, depth=4, num_heads=4, rope_axes=[16, 24, 24]))
    ratio = train_flops_per_sample(cfg, (256, 256), 33) / forward_flops_per_sample(
        cfg, (256, 256), 33
    )
    assert 2.8 < ratio <= 3.0


def test_flops_grow_with_depth_tokens_and_text():
    cfg = ModelConfig()
    base = train_flops_per_sample(cfg, (64, 64), 17, 8)
    deeper = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=4))
    assert train_flops_per_sample(deeper, (64, 64), 17, 8) > base
    assert train_flops_per_sample(cfg, (64, 64), 33, 8) > base
    assert train_flops_per_sample(cfg, (64, 64), 17, 16) > base
    assert train_flops_per_sample(cfg, (64, 64), 17) == train_flops_per_sample(
        cfg, (64, 64), 17, cfg.text_encoder.max_length
    )


def test_token_counts():
    counts = token_counts(ModelConfig(), (64, 128), 17, 10)
    assert (counts.latent_frames, counts.tokens_per_frame) == (5, 4 * 8)
    assert counts.video_tokens == 6 * 32 and counts.text_tokens == 10
    assert counts.audio_tokens_per_frame == 4 + 2 * 2


@pytest.mark.parametrize(
    ("resolution", "frames", "message"),
    [((64, 60), 17, "multiple of 16"), ((64, 64), 16, "1 \\+ 4k"), ((64, 64), 17, "text")],
)
def test_bad_shapes_are_named(resolution, frames, message):
    with pytest.raises(ValueError, match=message):
        token_counts(ModelConfig(), resolution, frames, 0 if message == "text" else None)
