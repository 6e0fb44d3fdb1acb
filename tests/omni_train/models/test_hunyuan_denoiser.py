"""HunyuanVideo's transformer wrapped with the omni conditions (model.backbone.family=hunyuan_video).

The reference is the bare diffusers model called as HunyuanVideoPipeline calls it: timestep
t * 1000, guidance 6.0 * 1000 per sample, the caption embeddings and mask, and (this project
having no CLIP) the wrapper's learned pooled vector. A fresh wrapper with the reference off must
compute exactly that, whatever audio and pose it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

pytest.importorskip(
    "diffusers",
    reason="diffusers is not installed (the foundation extra: pip install -e '.[foundation]')",
)

from omni_train.diffusion.flow import flow_matching_loss  # noqa: E402
from omni_train.models.denoiser import build_denoiser  # noqa: E402
from omni_train.models.encoders import build_frozen_encoders  # noqa: E402
from omni_train.models.hunyuan_denoiser import HunyuanOmniDenoiser  # noqa: E402
from omni_train.testing import compose_train_config  # noqa: E402

CONDITIONS = ("text", "ref", "audio", "pose")
FRAMES, PIXEL_FRAMES, LATENT = 3, 9, 4  # latent frames, their pixel frames, latent h = w
TEXT_TOKENS = 5
PER_FRAME = (LATENT // 2) ** 2  # tokens per latent frame (patch 2)
NUM_FRAME_TOKENS = FRAMES * PER_FRAME
# HunyuanVideoPipeline.__call__'s default guidance_scale, which it feeds the transformer x 1000.
GUIDANCE_SCALE = 6.0


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    composed, _ = compose_train_config(
        ["model=hunyuan_video_tiny", f"run_dir={tmp_path_factory.mktemp('run')}"]
    )
    assert composed.model.backbone.embedded_guidance == GUIDANCE_SCALE
    return composed.model


def make_model(cfg, seed=0, **dit):
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, **dit))
    return HunyuanOmniDenoiser(model_cfg).eval()


@pytest.fixture(scope="module")
def model(cfg):
    return make_model(cfg)


def make_inputs(cfg, batch=2, seed=0, **flags):
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    text_mask[-1, 3:] = False  # the last caption is padded
    active = {name: torch.ones(batch, dtype=torch.bool) for name in CONDITIONS}
    active.update({name: torch.as_tensor(value) for name, value in flags.items()})
    pixels = 8 * LATENT
    return dict(
        noisy=torch.randn(batch, 16, FRAMES, LATENT, LATENT, generator=gen),
        timesteps=torch.rand(batch, generator=gen),
        text=torch.randn(batch, TEXT_TOKENS, cfg.text_encoder.d_model, generator=gen),
        text_mask=text_mask,
        ref_latents=torch.randn(batch, 16, 1, LATENT, LATENT, generator=gen),
        audio_features=torch.randn(
            batch, PIXEL_FRAMES, cfg.audio_encoder.feature_dim, generator=gen
        ),
        pose_heatmaps=torch.rand(
            batch, cfg.pose_guider.num_keypoints, PIXEL_FRAMES, pixels, pixels, generator=gen
        ),
        active=active,
    )


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes})


def bare(model, inputs):
    """The diffusers transformer as the pipeline calls it; a sample with text off gets the
    wrapper's null token as its only valid caption token."""
    batch = inputs["noisy"].shape[0]
    text_on = inputs["active"]["text"]
    text = torch.where(text_on[:, None, None], inputs["text"], model.null_text)
    only_first = torch.zeros_like(inputs["text_mask"])
    only_first[:, 0] = True
    mask = torch.where(text_on[:, None], inputs["text_mask"], only_first)
    with torch.no_grad():
        return model.base(
            hidden_states=inputs["noisy"],
            timestep=inputs["timesteps"] * 1000.0,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            pooled_projections=model.pooled_text.expand(batch, -1),
            guidance=torch.tensor([GUIDANCE_SCALE] * batch) * 1000.0,
        ).sample


def assert_same(actual, expected):
    assert expected.abs().mean() > 0.1  # a real output, so the tolerance below means something
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def randomised(model, names):
    """A copy with the parameters whose names full-match ``names`` drawn at random, as if
    trained."""
    gen = torch.Generator().manual_seed(123)
    live = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in live.named_parameters():
            if any(re.fullmatch(pattern, name) for pattern in names):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return live


def per_frame_change(a, b):
    return (a - b).abs().amax(dim=(0, 1, 3, 4))


# The base untouched: a fresh wrapper with the reference off is the bare model.


@pytest.mark.parametrize("text_on", [True, False])
def test_fresh_wrapper_without_reference_is_the_base(cfg, model, text_on):
    inputs = make_inputs(cfg, ref=[False, False], text=[text_on, text_on])
    assert_same(run(model, inputs), bare(model, inputs))


@pytest.mark.parametrize(
    ("ref", "text"),
    [
        ([True, False, True], [True, True, True]),
        ([False, True, False], [False, True, True]),
        ([False, False, False], [True, False, True]),
        ([True, True, True], [True, True, True]),
    ],
)
def test_reference_off_samples_equal_the_base_in_any_batch(cfg, model, ref, text):
    inputs = make_inputs(cfg, batch=3, ref=ref, text=text)
    out, expected = run(model, inputs), bare(model, inputs)
    for i, ref_on in enumerate(ref):
        if ref_on:
            assert (out[i] - expected[i]).abs().max() > 1e-3
        else:
            assert_same(out[i], expected[i])


def test_trained_pooled_vector_and_null_token_feed_the_base(cfg, model):
    live = randomised(model, ["pooled_text", "null_text"])
    inputs = make_inputs(cfg, ref=[False, False], text=[True, False])
    assert_same(run(live, inputs), bare(live, inputs))
    assert (run(live, inputs) - run(model, inputs)).abs().max() > 1e-2


def test_inputs_absent_are_the_nulls(cfg, model):
    inputs = make_inputs(cfg, ref=[False, False])
    assert_same(run(model, inputs, audio_features=None, pose_heatmaps=None), bare(model, inputs))


# The reference's place: after the frame tokens, with latent frame 0's RoPE rows.


def first_block_rope(model, inputs):
    seen = {}

    def grab(module, args):
        seen["rope"] = args[4]

    handle = model.base.transformer_blocks[0].register_forward_pre_hook(grab)
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return seen["rope"]


def test_reference_rope_rows_are_latent_frame_zero(cfg, model):
    inputs = make_inputs(cfg)
    temporal = model.base.config.rope_axes_dim[0]
    passed = first_block_rope(model, inputs)
    base_rope = model.base.rope(inputs["noisy"])
    for rows, base_rows, identity in zip(passed, base_rope, (1, 0), strict=True):
        assert rows.shape == (NUM_FRAME_TOKENS + PER_FRAME, sum(model.base.config.rope_axes_dim))
        torch.testing.assert_close(rows[:NUM_FRAME_TOKENS], base_rows, rtol=0, atol=0)
        torch.testing.assert_close(rows[NUM_FRAME_TOKENS:], base_rows[:PER_FRAME], rtol=0, atol=0)
        # Temporal index 0: the temporal rotation of every reference row is the identity
        # (cos 1, sin 0), while latent frame 1's is not.
        assert (rows[NUM_FRAME_TOKENS:, :temporal] == identity).all()
        assert (rows[PER_FRAME : 2 * PER_FRAME, :temporal] != identity).any()


def test_reference_equal_to_frame_zero_is_frame_zero_in_every_block(cfg, model):
    inputs = make_inputs(cfg)
    inputs["ref_latents"] = inputs["noisy"][:, :, :1].clone()
    seen = {}

    def grab(module, args, output):
        seen["hidden"] = output[0]

    handle = model.base.single_transformer_blocks[-1].register_forward_hook(grab)
    try:
        run(model, inputs)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    assert hidden.shape[1] == NUM_FRAME_TOKENS + PER_FRAME
    torch.testing.assert_close(hidden[:, NUM_FRAME_TOKENS:], hidden[:, :PER_FRAME])
    assert (hidden[:, NUM_FRAME_TOKENS:] - hidden[:, PER_FRAME : 2 * PER_FRAME]).abs().max() > 1e-2


# The new modules: zero-initialised outputs, live once trained.


def test_audio_once_trained_changes_the_output(cfg, model):
    inputs = make_inputs(cfg, ref=[False, False])
    live = randomised(model, [r"audio_attn\.\d+\.out\.weight"])
    fresh = run(model, inputs)
    with_audio = run(live, inputs)
    audio_off = {**inputs["active"], "audio": torch.tensor([False, False])}
    null_audio = run(live, inputs, active=audio_off)
    assert (with_audio - fresh).abs().max() > 1e-2
    assert (with_audio - null_audio).abs().max() > 1e-2


def test_audio_reaches_only_its_own_frame(cfg):
    """Latent frame j's audio changes only frame j's output when it enters the last block (no
    later block mixes frames); with no audio window, pixel frames 5..8 are latent frame 2's."""
    model = randomised(make_model(cfg, audio_window=0), [r"audio_attn\.3\.out\.weight"])
    inputs = make_inputs(cfg)
    changed = inputs["audio_features"].clone()
    changed[:, 5:9] += 1.0
    change = per_frame_change(run(model, inputs), run(model, inputs, audio_features=changed))
    assert change[:2].max() == 0
    assert change[2] > 1e-3


def test_pose_once_trained_changes_the_output(cfg, model):
    inputs = make_inputs(cfg)
    live = randomised(model, [r"pose_patch_embed\.weight"])
    pose_off = {**inputs["active"], "pose": torch.tensor([False, False])}
    assert_same(run(live, inputs, active=pose_off), run(model, inputs, active=pose_off))
    assert (run(live, inputs) - run(model, inputs)).abs().max() > 1e-2


def test_motion_embedding_marks_only_motion_frames(cfg, model):
    inputs = make_inputs(cfg)
    live = randomised(model, [r"motion_embedding"])
    assert_same(run(live, inputs), run(model, inputs))
    assert (run(live, inputs, num_motion_latents=1) - run(model, inputs)).abs().max() > 1e-2
    assert_same(run(model, inputs, num_motion_latents=1), run(model, inputs))


# Parameter sets a trainer reads.


def test_new_modules_are_everything_outside_the_base(model):
    assert set(model.new_module_prefixes) == {
        "null_text",
        "pooled_text",
        "motion_embedding",
        "null_audio",
        "pose_guider.",
        "pose_patch_embed.",
        "audio_projector.",
        "audio_attn.",
    }
    for name, _ in model.named_parameters():
        assert name.startswith(model.new_module_prefixes) != name.startswith("base."), name
    assert len(model.audio_attn) == 4  # 2 dual- + 2 single-stream blocks


def test_lora_targets_are_the_attention_and_mlp_linears(model):
    dual = ["attn." + p for p in ("to_q", "to_k", "to_v", "to_out.0")]
    dual += ["attn." + p for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    dual += [f"{ff}.net.{p}" for ff in ("ff", "ff_context") for p in ("0.proj", "2")]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
    expected = {f"base.transformer_blocks.{i}.{name}" for i in range(2) for name in dual}
    expected |= {f"base.single_transformer_blocks.{i}.{name}" for i in range(2) for name in single}
    matched = {
        name for name, _ in model.named_modules() if re.fullmatch(model.lora_target_modules, name)
    }
    assert matched == expected
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in matched)


# Loading the base, and configs that cannot work.


@pytest.mark.parametrize("layout", ["transformer", "pipeline"])
def test_pretrained_base_loads_bit_identical(cfg, model, tmp_path, layout):
    target = tmp_path / "transformer" if layout == "pipeline" else tmp_path
    model.base.save_pretrained(target)
    backbone = dataclasses.replace(cfg.backbone, pretrained=str(tmp_path), diffusers_config={})
    loaded = HunyuanOmniDenoiser(dataclasses.replace(cfg, backbone=backbone)).eval()
    saved, restored = model.base.state_dict(), loaded.base.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    new = {k: v for k, v in model.state_dict().items() if not k.startswith("base.")}
    loaded.load_state_dict(new, strict=False)
    inputs = make_inputs(cfg)
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_config_errors_name_the_fix(cfg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    other_class = dataclasses.replace(cfg.backbone, pretrained=str(tmp_path), diffusers_config={})
    with pytest.raises(ValueError, match="WanTransformer3DModel.*model.backbone.family"):
        HunyuanOmniDenoiser(dataclasses.replace(cfg, backbone=other_class))
    unknown = dataclasses.replace(cfg.backbone, diffusers_config={"num_blocks": 2})
    with pytest.raises(ValueError, match=r"diffusers_config has \['num_blocks'\]"):
        HunyuanOmniDenoiser(dataclasses.replace(cfg, backbone=unknown))
    wide_text = dataclasses.replace(cfg.text_encoder, d_model=64)
    with pytest.raises(ValueError, match="model.text_encoder.d_model=64; set it to 32"):
        HunyuanOmniDenoiser(dataclasses.replace(cfg, text_encoder=wide_text))
    other_vae = dataclasses.replace(cfg.vae, latent_channels=4)
    with pytest.raises(ValueError, match="model.vae.latent_channels=16"):
        HunyuanOmniDenoiser(dataclasses.replace(cfg, vae=other_vae))


# Training through build_denoiser.


def training_step(cfg, checkpointing):
    dit = dataclasses.replace(cfg.dit, gradient_checkpointing=checkpointing)
    model = build_denoiser(dataclasses.replace(cfg, dit=dit))
    inputs = make_inputs(cfg, ref=[True, False], text=[True, False])
    calls = []
    model.base.transformer_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(inputs.pop("noisy").shape, generator=gen)
    noise, t = torch.randn(x0.shape, generator=gen), inputs.pop("timesteps")
    loss = flow_matching_loss(model, x0, noise, t, num_motion_latents=1, **inputs).mean()
    loss.backward()
    return model, loss, len(calls)


def test_build_denoiser_trains_base_and_new_modules(cfg):
    torch.manual_seed(0)
    model, loss, calls = training_step(cfg, checkpointing=False)
    assert isinstance(model, HunyuanOmniDenoiser) and calls == 1
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grad is not None for grad in grads.values())
    base_zero = [n for n, g in grads.items() if n.startswith("base.") and not g.abs().max() > 0]
    # The pooled vector's first layer sees pooled_text, zeros at init: its weight's gradient too.
    assert base_zero == ["base.time_text_embed.text_embedder.linear_1.weight"]
    # Zero-initialised outputs pass gradients to themselves, not yet to what feeds them.
    live = [r"audio_attn\.\d+\.out\..*", r"pose_patch_embed\.weight", "motion_embedding"]
    live += ["null_text", "pooled_text"]
    behind_zero = [r"audio_attn\.\d+\.(norm|q|kv|q_norm|k_norm)\..*", r"audio_projector\..*"]
    behind_zero += ["null_audio", r"pose_guider\..*"]
    for name, grad in grads.items():
        if any(re.fullmatch(p, name) for p in live):
            assert grad.abs().max() > 0, name
        elif any(re.fullmatch(p, name) for p in behind_zero):
            assert grad.abs().max() == 0, name

    torch.manual_seed(0)
    checkpointed, checkpointed_loss, checkpointed_calls = training_step(cfg, checkpointing=True)
    assert checkpointed_calls == 2  # each block runs again in the backward pass
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    for name, param in checkpointed.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-6)


def test_tiny_preset_encoders_feed_the_denoiser(cfg, model):
    torch.manual_seed(0)
    encoders = build_frozen_encoders(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, PIXEL_FRAMES, 8 * LATENT, 8 * LATENT, generator=gen) * 2 - 1
    latents = encoders.encode_video(video)
    text, text_mask = encoders.encode_text(["a person talks"])
    audio = encoders.encode_audio(torch.randn(1, 16_000, generator=gen), PIXEL_FRAMES)
    inputs = make_inputs(cfg, batch=1)
    inputs.update(
        noisy=latents,
        text=text,
        text_mask=text_mask,
        ref_latents=latents[:, :, :1],
        audio_features=audio,
    )
    out = run(model, inputs)
    assert latents.shape == out.shape == (1, 16, FRAMES, LATENT, LATENT)
    assert torch.isfinite(out).all()


def test_released_shapes_have_13b_parameters(tmp_path):
    composed, _ = compose_train_config(["model=hunyuan_video_13b", f"run_dir={tmp_path}"])
    assert composed.model.dit.gradient_checkpointing
    with torch.device("meta"):
        model = build_denoiser(composed.model)
    base = sum(p.numel() for p in model.base.parameters())
    new = sum(p.numel() for p in model.parameters()) - base
    print(f"hunyuan_video_13b: base {base:,} parameters, new modules {new:,}")
    assert base == 12_821_012_544
