import pytest
import torch

from omni_train.diffusion.config import DiffusionConfig
from omni_train.diffusion.flow import (
    flow_matching_loss,
    noisy_latents,
    sample_timesteps,
    shift_timesteps,
)
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser


def latents(seed, batch=3, frames=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, 4, 4, generator=gen)


def test_interpolation_endpoints():
    x0, noise = latents(0), latents(1)
    torch.testing.assert_close(noisy_latents(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(noisy_latents(x0, noise, torch.ones(3)), noise)


def test_exact_velocity_has_zero_loss_and_others_do_not():
    x0, noise, t = latents(0), latents(1), torch.rand(3)
    loss = flow_matching_loss(lambda x, t, **_: noise - x0, x0, noise, t)
    assert loss.shape == (3,)
    assert loss.abs().max() < 1e-12
    wrong = flow_matching_loss(lambda x, t, **_: x0 - noise, x0, noise, t)
    assert (wrong > 0).all()


def test_motion_frames_are_clean_and_not_counted():
    x0, noise, t = latents(0), latents(1), torch.full((3,), 0.7)
    seen = {}

    def model_fn(x, t, num_motion_latents, **cond):
        seen.update(x=x, m=num_motion_latents, cond=cond)
        v = noise - x0
        return torch.cat([v[:, :, :2] + 100.0, v[:, :, 2:]], dim=2)  # garbage on motion frames

    loss = flow_matching_loss(model_fn, x0, noise, t, num_motion_latents=2, text="caption")
    assert loss.abs().max() < 1e-12
    assert seen["m"] == 2 and seen["cond"] == {"text": "caption"}
    torch.testing.assert_close(seen["x"][:, :, :2], x0[:, :, :2])
    torch.testing.assert_close(seen["x"][:, :, 2:], (0.3 * x0 + 0.7 * noise)[:, :, 2:])
    with pytest.raises(ValueError):
        flow_matching_loss(model_fn, x0, noise, t, num_motion_latents=4)


def test_loss_averages_only_over_generated_frames():
    x0, noise, t = latents(0), latents(1), torch.rand(3)
    target = noise - x0
    off_by_one = flow_matching_loss(lambda x, t, **_: target + 1.0, x0, noise, t, 1)
    torch.testing.assert_close(off_by_one, torch.ones(3))


def test_shift():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all() and (shifted.diff() > 0).all()
    torch.testing.assert_close(shift_timesteps(torch.tensor(0.5), 3.0), torch.tensor(0.75))
    with pytest.raises(ValueError):
        shift_timesteps(t, 0.0)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sampled_timesteps_lie_inside_the_unit_interval(sampling):
    cfg = DiffusionConfig(timestep_sampling=sampling)
    t = sample_timesteps(cfg, 4096, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.03
    shifted = sample_timesteps(
        DiffusionConfig(timestep_sampling=sampling, shift=3.0),
        4096,
        torch.Generator().manual_seed(0),
    )
    assert shifted.mean() > t.mean() + 0.1


def test_logit_normal_concentrates_in_the_middle_and_is_reproducible():
    cfg = DiffusionConfig(timestep_sampling="logit_normal", logit_std=0.5)
    t = sample_timesteps(cfg, 4096, torch.Generator().manual_seed(1))
    uniform = sample_timesteps(
        DiffusionConfig(timestep_sampling="uniform"), 4096, torch.Generator().manual_seed(1)
    )
    assert t.std() < uniform.std()
    torch.testing.assert_close(t, sample_timesteps(cfg, 4096, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_timesteps(DiffusionConfig(timestep_sampling="cosine"), 4)


def test_gradient_flows_into_the_denoiser():
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_denoiser(cfg)
    batch = 2
    x0 = torch.randn(batch, 4, 3, 8, 8)
    cond = dict(
        text=torch.randn(batch, 5, cfg.text_encoder.d_model),
        text_mask=torch.ones(batch, 5, dtype=torch.bool),
        ref_latents=torch.randn(batch, 4, 1, 8, 8),
        audio_features=torch.randn(batch, 9, cfg.audio_encoder.feature_dim),
        pose_heatmaps=None,
        active={n: torch.ones(batch, dtype=torch.bool) for n in ("text", "ref", "audio", "pose")},
    )
    t = sample_timesteps(DiffusionConfig(), batch, torch.Generator().manual_seed(0))
    loss = flow_matching_loss(model, x0, torch.randn_like(x0), t, 1, **cond)
    loss.mean().backward()
    assert loss.shape == (batch,) and torch.isfinite(loss).all()
    assert model.backbone.final_layer.linear.weight.grad.abs().max() > 0
