"""The Wan backbone with the omni conditions: the base is untouched until the new modules train."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers", reason="the foundation extra (diffusers) is not installed")

from diffusers import WanTransformer3DModel  # noqa: E402

from omni_train.models.config import ModelConfig  # noqa: E402
from omni_train.models.denoiser import build_denoiser  # noqa: E402
from omni_train.models.foundation_backbone import load_diffusers_transformer  # noqa: E402
from omni_train.models.wan_denoiser import WanOmniDenoiser  # noqa: E402

TINY_WAN = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
CHANNELS, FRAMES, HEIGHT, WIDTH = 4, 3, 4, 6
PIXEL_FRAMES = 1 + 4 * (FRAMES - 1)


def tiny_cfg(**backbone) -> ModelConfig:
    cfg = ModelConfig()
    cfg.backbone.family = "wan"
    cfg.backbone.diffusers_config = dict(TINY_WAN)
    for key, value in backbone.items():
        setattr(cfg.backbone, key, value)
    cfg.vae.latent_channels = CHANNELS
    return cfg


def tiny_model(seed: int = 0, **backbone) -> WanOmniDenoiser:
    torch.manual_seed(seed)
    return build_denoiser(tiny_cfg(**backbone)).eval()


def inputs(batch: int = 2, seed: int = 1, text_tokens: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    mask[-1, 3:] = False
    cfg = ModelConfig()
    return {
        "noisy": torch.randn(batch, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=gen),
        "timesteps": torch.rand(batch, generator=gen),
        "text": torch.randn(batch, text_tokens, 32, generator=gen) * mask[..., None],
        "text_mask": mask,
        "ref_latents": torch.randn(batch, CHANNELS, 1, HEIGHT, WIDTH, generator=gen),
        "audio_features": torch.randn(
            batch, PIXEL_FRAMES, cfg.audio_encoder.feature_dim, generator=gen
        ),
        "pose_heatmaps": torch.rand(batch, 17, PIXEL_FRAMES, HEIGHT * 8, WIDTH * 8, generator=gen),
    }


def flags(batch: int = 2, **values) -> dict[str, torch.Tensor]:
    active = {
        name: torch.ones(batch, dtype=torch.bool) for name in ("text", "ref", "audio", "pose")
    }
    for name, value in values.items():
        active[name] = torch.as_tensor(value, dtype=torch.bool).expand(batch).clone()
    return active


def bare_output(model: WanOmniDenoiser, x: dict) -> torch.Tensor:
    """The diffusers model alone, fed as the Wan pipeline feeds it: timesteps * 1000 and the
    caption's umT5 states zero-padded to the text length."""
    text = torch.zeros(x["text"].shape[0], model.text_length, x["text"].shape[2])
    text[:, : x["text"].shape[1]] = x["text"]
    return model.base(x["noisy"], x["timesteps"] * 1000.0, text).sample


def randomise_new_modules(model: WanOmniDenoiser, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(model.new_module_prefixes):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@torch.no_grad()
def test_zero_initialised_modules_leave_the_base_output_unchanged():
    model, x = tiny_model(), inputs()
    out = model(**x, active=flags(ref=False))
    expected = bare_output(model, x)
    assert out.shape == x["noisy"].shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_reference_off_samples_equal_the_base_and_on_samples_attend_to_it():
    model, x = tiny_model(), inputs()
    out = model(**x, active=flags(ref=[True, False]))
    expected = bare_output(model, x)
    torch.testing.assert_close(out[1], expected[1], rtol=0, atol=1e-6)
    assert (out[0] - expected[0]).abs().max() > 1e-3
    # Masking one sample's reference does not change another sample's output.
    all_on = model(**x, active=flags())
    torch.testing.assert_close(out[0], all_on[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_text_off_is_a_learned_null_token_then_zero_padding():
    model, x = tiny_model(), inputs()
    out = model(**x, active=flags(ref=False, text=False))
    null = torch.zeros(2, model.text_length, 32)
    null[:, 0] = model.null_text
    expected = model.base(x["noisy"], x["timesteps"] * 1000.0, null).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_reference_tokens_take_the_rotary_rows_of_latent_frame_zero():
    model, x = tiny_model(), inputs(batch=1)
    rope_cos, rope_sin = model.base.rope(x["noisy"])
    per_frame = (HEIGHT // 2) * (WIDTH // 2)
    captured = {}

    def keep_rope(module, args):
        captured["rope"] = args[3]

    handle = model.base.blocks[0].attn1.register_forward_pre_hook(keep_rope)
    model(**x, active=flags(batch=1))
    handle.remove()
    ref_cos = captured["rope"][0][:, -per_frame:]
    torch.testing.assert_close(ref_cos, rope_cos[:, :per_frame], rtol=0, atol=0)
    torch.testing.assert_close(captured["rope"][1][:, -per_frame:], rope_sin[:, :per_frame])
    assert (ref_cos - rope_cos[:, per_frame : 2 * per_frame]).abs().max() > 1e-3


@pytest.mark.parametrize("module", ["audio", "pose", "motion"])
@torch.no_grad()
def test_each_new_module_changes_the_output_once_trained(module):
    model, x = tiny_model(), inputs()
    motion = 1 if module == "motion" else 0
    before = model(**x, active=flags(ref=False), num_motion_latents=motion)
    randomise_new_modules(model)
    off = {"audio": "audio", "pose": "pose"}.get(module)
    active = flags(ref=False, **({off: False} if off else {}))
    after_off = model(**x, active=active, num_motion_latents=motion)
    after_on = model(**x, active=flags(ref=False), num_motion_latents=motion)
    assert (after_on - before).abs().max() > 1e-3
    if module == "motion":
        no_motion = model(**x, active=flags(ref=False))
        assert (after_on - no_motion).abs().max() > 1e-3
    else:
        assert (after_on - after_off).abs().max() > 1e-3


@torch.no_grad()
def test_audio_cross_attention_is_frame_local():
    # With one block, frame j's update depends only on frame j's audio tokens: changing the
    # audio of the last pixel frames (latent frame 2 only) leaves frames 0 and 1 unchanged.
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.backbone.diffusers_config["num_layers"] = 1
    model = build_denoiser(cfg).eval()
    randomise_new_modules(model)
    x = inputs()
    out = model(**x, active=flags(ref=False, pose=False))
    x["audio_features"][:, -1] += 1.0
    changed = model(**x, active=flags(ref=False, pose=False))
    delta = (changed - out).abs().amax(dim=(0, 1, 3, 4))
    assert delta[:2].max() == 0
    assert delta[2] > 1e-4


def test_new_modules_and_lora_targets_cover_what_the_base_lacks():
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    new = [n for n in names if n.startswith(model.new_module_prefixes)]
    assert new and all(not n.startswith("base.") for n in new)
    assert sorted(set(names) - set(new)) == sorted(n for n in names if n.startswith("base."))
    import re

    targets = [n for n, _ in model.named_modules() if re.fullmatch(model.lora_target_modules, n)]
    per_block = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    ]
    assert targets == [f"base.blocks.{i}.{m}" for i in range(2) for m in per_block]
    assert all(isinstance(model.get_submodule(t), torch.nn.Linear) for t in targets)


def test_one_training_step_gives_gradients_to_base_and_new_modules():
    model, x = tiny_model().train(), inputs()
    model(**x, active=flags(ref=[True, False]), num_motion_latents=1).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["base.blocks.0.attn1.to_q.weight"].abs().sum() > 0
    # Zero-initialised outputs get a gradient at step 0 (their inputs are not zero).
    assert grads["audio_attn.0.out.weight"].abs().sum() > 0
    assert grads["pose_patch_embed.weight"].abs().sum() > 0
    assert grads["motion_embedding"].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    x = inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.gradient_checkpointing = checkpointing
        randomise_new_modules(model)
        model(**x, active=flags(ref=[True, False])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["own", "pipeline"])
@torch.no_grad()
def test_save_pretrained_round_trip_is_exact(tmp_path, layout):
    model, x = tiny_model(), inputs()
    target = tmp_path / "transformer" if layout == "pipeline" else tmp_path
    model.base.save_pretrained(target, max_shard_size="20KB")
    assert len(list(target.glob("*.safetensors"))) > 1  # sharded, as released checkpoints are
    loaded = tiny_model(seed=7, pretrained=str(tmp_path), diffusers_config={})
    base_state, loaded_state = model.base.state_dict(), loaded.base.state_dict()
    assert base_state.keys() == loaded_state.keys()
    for key, value in base_state.items():
        assert torch.equal(loaded_state[key], value), key
    loaded.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("base.")}, strict=False
    )
    torch.testing.assert_close(
        loaded(**x, active=flags()), model(**x, active=flags()), rtol=0, atol=0
    )


def test_bad_backbone_settings_fail_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"\['num_layer'\], which WanTransformer3DModel"):
        tiny_model(diffusers_config={**TINY_WAN, "num_layer": 1})
    with pytest.raises(FileNotFoundError, match="transformer/ subfolder"):
        tiny_model(pretrained=str(tmp_path / "missing"), diffusers_config={})
    cfg = tiny_cfg()
    cfg.text_encoder.d_model = 64
    with pytest.raises(ValueError, match="model.text_encoder.d_model=64; set it to 32"):
        build_denoiser(cfg)
    cfg = tiny_cfg()
    cfg.vae.latent_channels = 16
    with pytest.raises(ValueError, match="model.vae.latent_channels=4"):
        build_denoiser(cfg)
    other = load_diffusers_transformer("WanTransformer3DModel", tiny_cfg().backbone)
    other.save_pretrained(tmp_path / "wan")
    config_file = tmp_path / "wan" / "config.json"
    config_file.write_text(config_file.read_text().replace("WanTransformer3DModel", "Other"))
    with pytest.raises(ValueError, match="config of Other, not of the WanTransformer3DModel"):
        tiny_model(pretrained=str(tmp_path / "wan"), diffusers_config={})
    assert isinstance(other, WanTransformer3DModel)
