import copy

import pytest
import torch

from omni_train.models.conditioning import audio_window_indices
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser, count_parameters, video_stream_positions

BATCH, FRAMES, PIXEL_FRAMES, LATENT, PIXELS = 2, 5, 17, 8, 64
CONDITIONS = ("text", "ref", "audio", "pose")


def make_inputs(seed=0, batch=BATCH, cfg=None):
    cfg = cfg or ModelConfig()
    gen = torch.Generator().manual_seed(seed)
    channels = cfg.vae.latent_channels
    text_mask = torch.ones(batch, 6, dtype=torch.bool)
    text_mask[-1, 4:] = False
    return dict(
        noisy=torch.randn(batch, channels, FRAMES, LATENT, LATENT, generator=gen),
        timesteps=torch.rand(batch, generator=gen),
        text=torch.randn(batch, 6, cfg.text_encoder.d_model, generator=gen),
        text_mask=text_mask,
        ref_latents=torch.randn(batch, channels, 1, LATENT, LATENT, generator=gen),
        audio_features=torch.randn(
            batch, PIXEL_FRAMES, cfg.audio_encoder.feature_dim, generator=gen
        ),
        pose_heatmaps=torch.rand(
            batch, cfg.pose_guider.num_keypoints, PIXEL_FRAMES, PIXELS, PIXELS, generator=gen
        ),
        active={name: torch.ones(batch, dtype=torch.bool) for name in CONDITIONS},
    )


def perturb_zero_inits(model, skip=("pose_patch_embed",)):
    """Give the zero-initialised gates and projections random values, so every path is live."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.abs().max() == 0 and not name.startswith(skip):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def make_model(skip=("pose_patch_embed",), **dit_overrides):
    torch.manual_seed(0)
    cfg = ModelConfig()
    for key, value in dit_overrides.items():
        setattr(cfg.dit, key, value)
    return perturb_zero_inits(build_denoiser(cfg), skip).eval(), cfg


@pytest.fixture(scope="module")
def model():
    """Every path live, pose included: its patch embedding gets random weights too."""
    return make_model(skip=())[0]


def run(model, inputs, **changes):
    args = {**inputs, **changes}
    with torch.no_grad():
        return model(**args)


def with_flag(inputs, name, value):
    active = dict(inputs["active"])
    active[name] = torch.full((BATCH,), value, dtype=torch.bool)
    return active


def per_frame_change(a, b):
    return (a - b).abs().amax(dim=(0, 1, 3, 4))


def test_output_is_a_velocity_for_every_latent(model):
    inputs = make_inputs()
    out = run(model, inputs)
    assert out.shape == inputs["noisy"].shape
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero_velocity():
    out = run(build_denoiser(ModelConfig()), make_inputs())
    assert out.abs().max() == 0


def test_text_and_video_streams_have_separate_weights():
    model, _ = make_model()
    inputs = make_inputs()
    model(**inputs).square().mean().backward()
    for block in model.backbone.blocks:
        text_ids = {id(p) for p in block.text.parameters()}
        video_ids = {id(p) for p in block.video.parameters()}
        assert not text_ids & video_ids
        assert block.text.qkv.weight.grad.abs().max() > 0
        assert block.video.qkv.weight.grad.abs().max() > 0
        assert not torch.allclose(block.text.qkv.weight[:64], block.video.qkv.weight[:64])


def test_rope_positions_reference_at_time_zero_video_at_its_frame():
    positions = video_stream_positions(frames=3, grid_h=2, grid_w=4)
    frame_part, ref_part = positions[: 3 * 8], positions[3 * 8 :]
    assert frame_part[:, 0].tolist() == [t for t in range(3) for _ in range(8)]
    assert ref_part[:, 0].tolist() == [0] * 8
    assert ref_part[:, 1:].tolist() == frame_part[:8, 1:].tolist()  # same (h, w) grid


def test_video_tokens_know_their_frame(model):
    # Without audio, pose and motion frames only RoPE tells frames apart: swapping two frames
    # of the input must not simply swap the outputs.
    inputs = make_inputs()
    order = [0, 3, 2, 1, 4]
    plain = run(model, inputs, audio_features=None, pose_heatmaps=None)
    swapped = run(
        model, inputs, noisy=inputs["noisy"][:, :, order], audio_features=None, pose_heatmaps=None
    )
    assert (swapped - plain[:, :, order]).abs().max() > 1e-4


def test_audio_is_frame_local_within_its_window():
    model, cfg = make_model(depth=1)  # one block: no later joint attention spreads the change
    inputs = make_inputs()
    pixel_frame = 6
    changed = inputs["audio_features"].clone()
    changed[:, pixel_frame] += 2.0
    moved = per_frame_change(run(model, inputs, audio_features=changed), run(model, inputs))
    windows = audio_window_indices(FRAMES, cfg.dit.audio_window)
    expected = [(windows[j] == pixel_frame).any().item() for j in range(FRAMES)]
    assert expected == [False, True, True, False, False]
    assert [bool(m > 1e-6) for m in moved] == expected


def test_audio_reaches_every_block(model):
    inputs = make_inputs()
    seen = {}
    hooks = [
        block.audio_attn.register_forward_hook(
            lambda _m, _i, out, i=i: seen.setdefault(i, []).append(out.detach().clone())
        )
        for i, block in enumerate(model.backbone.blocks)
    ]
    try:
        run(model, inputs)
        run(model, inputs, audio_features=inputs["audio_features"] + 1.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == list(range(len(model.backbone.blocks)))
    for first, second in seen.values():
        assert (first - second).abs().max() > 1e-6


def test_pose_is_silent_until_trained():
    model, _ = make_model()  # pose patch embedding still at its zero init
    inputs = make_inputs()
    without = run(model, inputs, pose_heatmaps=None)
    other_pose = torch.rand_like(inputs["pose_heatmaps"])
    torch.testing.assert_close(run(model, inputs), without, rtol=0, atol=0)
    torch.testing.assert_close(run(model, inputs, pose_heatmaps=other_pose), without)

    with torch.no_grad():
        model.pose_patch_embed.weight.normal_(std=0.1)
    trained = run(model, inputs)
    assert (trained - run(model, inputs, pose_heatmaps=other_pose)).abs().max() > 1e-6
    torch.testing.assert_close(run(model, inputs, pose_heatmaps=None), without)


def test_pose_off_is_zero_pose_features_per_sample(model):
    # The guider's features of any heatmaps (blank ones too: its biases) are non-zero and
    # reach the output through the randomised pose patch embedding ...
    inputs = make_inputs()
    without = run(model, inputs, pose_heatmaps=None)
    for heatmaps in (inputs["pose_heatmaps"], torch.zeros_like(inputs["pose_heatmaps"])):
        moved = (run(model, inputs, pose_heatmaps=heatmaps) - without).abs().amax(dim=(1, 2, 3, 4))
        assert (moved > 1e-4).all()
    # ... so a sample with pose off matches pose=None exactly while its neighbour keeps pose.
    active = dict(inputs["active"], pose=torch.tensor([True, False]))
    mixed = run(model, inputs, active=active)
    torch.testing.assert_close(mixed[1], without[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], run(model, inputs)[0], rtol=0, atol=0)
    torch.testing.assert_close(
        run(model, inputs, active=with_flag(inputs, "pose", False)), without, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        ("text", "text"),
        ("ref", "ref_latents"),
        ("audio", "audio_features"),
        ("pose", "pose_heatmaps"),
    ],
)
def test_inactive_condition_is_replaced_by_its_null(model, condition, field):
    inputs = make_inputs()
    other = torch.randn_like(inputs[field])
    off = with_flag(inputs, condition, False)
    torch.testing.assert_close(
        run(model, inputs, active=off), run(model, inputs, active=off, **{field: other})
    )
    assert (run(model, inputs) - run(model, inputs, **{field: other})).abs().max() > 1e-6


def test_inactive_text_ignores_its_mask_and_absent_audio_uses_the_null(model):
    inputs = make_inputs()
    off = with_flag(inputs, "text", False)
    short_mask = torch.zeros_like(inputs["text_mask"])
    torch.testing.assert_close(
        run(model, inputs, active=off), run(model, inputs, active=off, text_mask=short_mask)
    )
    audio_off = with_flag(inputs, "audio", False)
    torch.testing.assert_close(
        run(model, inputs, audio_features=None), run(model, inputs, active=audio_off)
    )


def test_padded_text_positions_are_ignored(model):
    inputs = make_inputs()  # the last sample's text tokens 4 and 5 are padding
    text = inputs["text"].clone()
    text[-1, 4:] = torch.randn(2, text.shape[-1])
    torch.testing.assert_close(run(model, inputs, text=text), run(model, inputs))
    text[-1, 3] += 1.0
    assert (run(model, inputs, text=text) - run(model, inputs)).abs().max() > 1e-6


def test_motion_frames_are_marked(model):
    inputs = make_inputs()
    assert (run(model, inputs, num_motion_latents=2) - run(model, inputs)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="num_motion_latents"):
        run(model, inputs, num_motion_latents=FRAMES)


def test_samples_do_not_see_each_other(model):
    inputs = make_inputs()
    other = make_inputs(seed=5)
    mixed = {
        key: (
            {name: torch.stack([value[name][0], ~value[name][1]]) for name in value}
            if key == "active"
            else torch.cat([value[:1], other[key][1:]])
        )
        for key, value in inputs.items()
    }
    out = run(model, inputs)
    out_mixed = run(model, mixed)
    torch.testing.assert_close(out_mixed[0], out[0])
    assert (out_mixed[1] - out[1]).abs().max() > 1e-6
    single = {
        key: ({n: f[:1] for n, f in value.items()} if key == "active" else value[:1])
        for key, value in inputs.items()
    }
    torch.testing.assert_close(run(model, single)[0], out[0], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, _ = make_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.gradient_checkpointing = True
    inputs = make_inputs()
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(**inputs).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == len(list(plain.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_new_module_prefixes_name_the_audio_and_pose_parts(model):
    new = {n for n, _ in model.named_parameters() if n.startswith(model.new_module_prefixes)}
    assert any(n.startswith("audio_projector.") for n in new)
    assert any(n.startswith("pose_guider.") for n in new)
    assert "pose_patch_embed.weight" in new and "null_audio" in new
    for i in range(len(model.backbone.blocks)):
        assert f"backbone.blocks.{i}.audio_attn.out.weight" in new
        assert f"backbone.blocks.{i}.video.qkv.weight" not in new
    assert "patch_embed.weight" not in new and "text_proj.1.weight" not in new


def test_count_parameters(model):
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == counts["total"]
    children = [name for name, _ in model.named_children()]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    assert sum(counts[name] for name in children + own) == counts["total"]


def test_invalid_rope_axes_are_reported():
    cfg = ModelConfig()
    cfg.dit.rope_axes = [4, 4, 4]
    with pytest.raises(ValueError, match="rope_axes"):
        build_denoiser(cfg)


def backbone_arguments(model, inputs, **changes):
    """The tensors the denoiser hands its block stack in one forward pass."""
    seen = {}

    def grab(_module, args, kwargs):
        names = ("text", "video", "cond", "key_mask", "rope_cos", "rope_sin", "audio_tokens")
        seen.update(zip(names, args, strict=False), **kwargs)

    hook = model.backbone.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(model, inputs, **changes)
    finally:
        hook.remove()
    return seen


def test_reference_tokens_get_zero_temporal_rope_in_the_forward_pass(model):
    seen = backbone_arguments(model, make_inputs())
    grid = (LATENT // 2) ** 2
    time_pairs = model.rope_axes[0] // 2
    cos, sin = seen["rope_cos"], seen["rope_sin"]
    assert cos.shape[0] == (FRAMES + 1) * grid  # frame tokens, then ONE frame of reference
    ref_cos, ref_sin = cos[FRAMES * grid :], sin[FRAMES * grid :]
    assert torch.equal(ref_cos[:, :time_pairs], torch.ones_like(ref_cos[:, :time_pairs]))
    assert torch.equal(ref_sin[:, :time_pairs], torch.zeros_like(ref_sin[:, :time_pairs]))
    # The reference keeps its spatial RoPE, the same as frame 0's (h, w) grid ...
    torch.testing.assert_close(ref_cos, cos[:grid])
    # ... while later video frames keep their temporal RoPE.
    assert not torch.allclose(cos[2 * grid : 3 * grid, :time_pairs], ref_cos[:, :time_pairs])


def test_reference_is_packed_once_not_copied_per_frame_or_block(model):
    seen = backbone_arguments(model, make_inputs())
    grid = (LATENT // 2) ** 2
    assert seen["video"].shape[1] == FRAMES * grid + grid
    assert seen["num_frame_tokens"] == FRAMES * grid
    # Audio tokens are per latent frame: (B, L, 4 + 2 window, hidden), aligned to the latents.
    assert seen["audio_tokens"].shape[:3] == (BATCH, FRAMES, 4 + 2 * 2)


def test_motion_frames_condition_the_generated_frames(model):
    inputs = make_inputs()
    motion = 2
    changed = inputs["noisy"].clone()
    changed[:, :, :motion] = torch.randn_like(changed[:, :, :motion])
    before = run(model, inputs, num_motion_latents=motion)
    after = run(model, inputs, noisy=changed, num_motion_latents=motion)
    moved = per_frame_change(after, before)
    assert all(m > 1e-5 for m in moved[motion:])  # every generated frame sees the motion frames


@pytest.mark.parametrize(
    ("condition", "null"),
    [("text", "null_text"), ("ref", "null_reference"), ("audio", "null_audio")],
)
def test_switched_off_condition_is_its_learned_null_not_dropped(condition, null):
    model, _ = make_model(skip=())
    inputs = make_inputs()
    off = with_flag(inputs, condition, False)
    before_off, before_on = run(model, inputs, active=off), run(model, inputs)
    with torch.no_grad():
        getattr(model, null).add_(torch.randn_like(getattr(model, null)))
    # The null stands in for the condition: it matters when the condition is off ...
    assert (run(model, inputs, active=off) - before_off).abs().max() > 1e-5
    # ... and only then.
    torch.testing.assert_close(run(model, inputs), before_on)


def test_switched_off_pose_has_no_null_and_ignores_the_pose_weights():
    # Pose off is zero features, not a learned null: changing the guider and the pose patch
    # embedding moves the output only while pose is on.
    model, _ = make_model(skip=())
    inputs = make_inputs()
    off = with_flag(inputs, "pose", False)
    before_off, before_on = run(model, inputs, active=off), run(model, inputs)
    with torch.no_grad():
        for param in (*model.pose_guider.parameters(), model.pose_patch_embed.weight):
            param.add_(torch.randn_like(param) * 0.1)
    assert (run(model, inputs) - before_on).abs().max() > 1e-4
    torch.testing.assert_close(run(model, inputs, active=off), before_off, rtol=0, atol=0)


def test_checkpoint_every_n_blocks_recomputes_only_those_blocks():
    model, _ = make_model(depth=4, gradient_checkpointing=True, checkpoint_every_n_blocks=2)
    assert model.backbone.checkpointed_blocks() == [0, 2]
    model_all, _ = make_model(depth=4, gradient_checkpointing=True)
    assert model_all.backbone.checkpointed_blocks() == [0, 1, 2, 3]
    model_none, _ = make_model(depth=4)
    assert model_none.backbone.checkpointed_blocks() == []
    inputs = make_inputs()
    grads = []
    for candidate in (model_none, model):
        candidate.train()
        candidate(**inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in candidate.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
