"""Training cost counted on the meta device (omni_train/models/training_cost.py): FLOPs equal
the closed form where it applies and the backward rule derived by hand for frozen-base modes;
depth extrapolation equals the full count; parameter counts per mode equal the built models;
saved-tensor bytes equal those of a real forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omni_train.describe import model_preset
from omni_train.models.config import DiTConfig, ModelConfig, PoseGuiderConfig
from omni_train.models.denoiser import attention_heads, build_denoiser
from omni_train.models.finetune import FINETUNE_MODES, apply_finetune_mode, is_lora_parameter
from omni_train.models.flops import (
    Flops,
    flop_breakdown,
    linear,
    token_counts,
    train_flops_per_sample,
)
from omni_train.models.training_cost import (
    _count,
    _pass_figures,
    build_on_meta,
    denoiser_inputs,
    lora_target_linears,
    parameter_counts,
    train_flops_per_sample_of,
    training_cost,
    with_block_counts,
)

RESOLUTION, FRAMES, TEXT = (64, 64), 17, 24
RANK = 4


def attention_heavy_config() -> ModelConfig:
    return ModelConfig(
        dit=DiTConfig(hidden_size=32, depth=3, num_heads=2, patch_size=1, rope_axes=[4, 6, 6]),
        pose_guider=PoseGuiderConfig(num_keypoints=2, hidden_channels=2, out_channels=2),
    )


@pytest.mark.parametrize("make_config", [ModelConfig, attention_heavy_config])
def test_counted_full_training_equals_the_closed_form(make_config):
    cfg = make_config()
    cost = training_cost(cfg, RESOLUTION, FRAMES, TEXT, "full", RANK, "fp32")
    parts = flop_breakdown(cfg, RESOLUTION, FRAMES, TEXT).values()
    assert cost.forward_flops == sum(p.forward for p in parts)
    assert cost.train_flops == train_flops_per_sample(cfg, RESOLUTION, FRAMES, TEXT)


def _frozen_base_backward(cfg: ModelConfig) -> int:
    """The backward of new_modules mode by hand (module doc of training_cost.py): the new
    modules (pose, audio) and attention as in full training; the base's linears behind a
    trainable module (everything after the pose embedding joins the frame tokens) 1x their
    forward; the rest (patch, text and timestep embeddings, every adaLN modulation, and the
    first block's text projections, which see only frozen text) nothing."""
    full = flop_breakdown(cfg, RESOLUTION, FRAMES, TEXT)
    n = token_counts(cfg, RESOLUTION, FRAMES, TEXT)
    d, depth = cfg.dit.hidden_size, cfg.dit.depth
    mlp = int(d * cfg.dit.mlp_ratio)
    input_grads = Flops()
    for index in range(depth):
        emits = index < depth - 1
        video_tokens = n.video_tokens
        input_grads += linear(video_tokens, d, 3 * d) + linear(video_tokens, d, d)
        input_grads += linear(video_tokens, d, mlp) + linear(video_tokens, mlp, d)
        if index > 0:
            input_grads += linear(n.text_tokens, d, (3 if emits else 2) * d)
        if emits:
            input_grads += linear(n.text_tokens, d, d)
            input_grads += linear(n.text_tokens, d, mlp) + linear(n.text_tokens, mlp, d)
    patch_values = cfg.vae.latent_channels * cfg.dit.patch_size**2
    input_grads += linear(n.frame_tokens, d, patch_values)
    trained = full["pose"].backward + full["audio"].backward + full["joint_attention"].backward
    return trained + input_grads.forward


def _lora_adapters(cfg: ModelConfig) -> tuple[int, int]:
    """(forward, backward) of the adapters: x -> A (rank x in) -> B (out x rank) per target,
    backward the weight gradients of A and B, B's input gradient, and A's input gradient
    where x needs one (not for the first block's text projection, which sees frozen text)."""
    n = token_counts(cfg, RESOLUTION, FRAMES, TEXT)
    forward = backward = 0
    for name, module in lora_target_linears(build_on_meta(cfg)):
        rows = n.text_tokens if ".text." in name else n.video_tokens
        a, b = 2 * rows * RANK * module.in_features, 2 * rows * RANK * module.out_features
        frozen_input = name == "backbone.blocks.0.text.qkv"
        forward += a + b
        backward += a * (1 if frozen_input else 2) + 2 * b
    return forward, backward


def test_frozen_base_backward_follows_the_derived_rule():
    cfg = ModelConfig()
    forward = sum(p.forward for p in flop_breakdown(cfg, RESOLUTION, FRAMES, TEXT).values())
    new = training_cost(cfg, RESOLUTION, FRAMES, TEXT, "new_modules", RANK, "fp32")
    assert new.forward_flops == forward
    assert new.train_flops - new.forward_flops == _frozen_base_backward(cfg)
    lora = training_cost(cfg, RESOLUTION, FRAMES, TEXT, "lora", RANK, "fp32")
    adapters_forward, adapters_backward = _lora_adapters(cfg)
    assert lora.forward_flops == forward + adapters_forward
    assert lora.train_flops - lora.forward_flops == _frozen_base_backward(cfg) + adapters_backward
    full = training_cost(cfg, RESOLUTION, FRAMES, TEXT, "full", RANK, "fp32")
    assert new.train_flops < lora.train_flops < full.train_flops


@pytest.mark.parametrize(
    ("preset", "blocks", "sequence_parallel"),
    [
        ("wan_tiny", {"num_layers": 4}, 1),
        ("hunyuan_video_tiny", {"num_layers": 3, "num_single_layers": 3}, 2),
        ("tiny", {"depth": 5}, 1),
        ("tiny", {"depth": 5}, 2),
    ],
)
def test_depth_extrapolation_equals_the_full_count(preset, blocks, sequence_parallel):
    cfg = with_block_counts(model_preset(preset, ["model.dit.gradient_checkpointing=true"]), blocks)
    inputs = denoiser_inputs(cfg, (32, 32), 9, 4)
    spec = (inputs, "lora", RANK, torch.float32, sequence_parallel)
    direct = _pass_figures(cfg, *spec)
    cost = _count(cfg, (32, 32), 9, 4, "lora", RANK, "fp32", sequence_parallel)
    forward, train, saved, kept, sent, largest, checkpointed = direct
    assert checkpointed == sum(blocks.values())
    assert (cost.forward_flops, cost.train_flops, cost.saved_bytes) == (forward, train, saved)
    assert cost.activation_bytes == kept + (saved - kept) // checkpointed
    assert (cost.sent_bytes, cost.largest_exchange_bytes) == (sent, largest)
    assert (sent > 0) == (sequence_parallel > 1)


@pytest.mark.parametrize("preset", ["tiny", "wan_tiny", "hunyuan_video_tiny"])
def test_parameter_counts_match_the_built_models(preset):
    cfg = model_preset(preset)
    counts = parameter_counts(build_on_meta(cfg), RANK)
    for mode in FINETUNE_MODES:
        torch.manual_seed(0)
        model = apply_finetune_mode(build_denoiser(cfg), mode, RANK)
        trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        assert sum(trained.values()) == counts.trainable(mode)
        assert sum(p.numel() for p in model.parameters()) == counts.total + (
            counts.lora_adapters if mode == "lora" else 0
        )
        if mode == "lora":
            adapters = sum(v for n, v in trained.items() if is_lora_parameter(n))
            assert adapters == counts.lora_adapters > 0
    assert counts.new_modules > 0 and counts.base > 0


def real_saved_bytes(cfg: ModelConfig, mode: str) -> int:
    """Bytes a real CPU forward saves for backward, each storage once, parameters excluded."""
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, gradient_checkpointing=False))
    torch.manual_seed(0)
    model = apply_finetune_mode(build_denoiser(cfg), mode, RANK).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inputs = denoiser_inputs(cfg, (32, 32), 5, 4, device="cpu")
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(storage.nbytes() for storage in saved.values())


@pytest.mark.parametrize("preset", ["tiny", "wan_tiny", "hunyuan_video_tiny", "attention_heavy"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_counted_saved_bytes_match_a_real_forward(preset, mode):
    # Measured: 0.998 (tiny), 1.000 (wan_tiny), 0.999 (hunyuan_video_tiny), whose pose
    # guider features at full resolution dominate, and 0.985 (attention_heavy, there so that
    # saving the math kernel's attention probabilities would show; the CPU's fused kernel
    # saves a little more per attention than the one counted).
    cfg = attention_heavy_config() if preset == "attention_heavy" else model_preset(preset)
    counted = training_cost(cfg, (32, 32), 5, 4, mode, RANK, "fp32").saved_bytes
    assert counted / real_saved_bytes(cfg, mode) == pytest.approx(1.0, abs=0.02)


def test_mfu_flops_of_any_text_length_equal_a_count_at_that_length():
    hunyuan = model_preset("hunyuan_video_tiny")
    for cfg, mode in ((hunyuan, "full"), (hunyuan, "lora"), (ModelConfig(), "new_modules")):
        counted = training_cost(cfg, (32, 32), 5, 7, mode, RANK, "fp32").train_flops
        assert train_flops_per_sample_of(cfg, (32, 32), 5, 7, mode, RANK) == counted
    own = ModelConfig()
    assert train_flops_per_sample_of(own, (32, 32), 5, 7) == train_flops_per_sample(
        own, (32, 32), 5, 7
    )


@pytest.mark.parametrize(
    ("preset", "base"),
    [
        # diffusers' WanTransformer3DModel / HunyuanVideoTransformer3DModel at the released shapes
        ("wan21_1_3b", 1_418_996_800),
        ("wan21_14b", 14_288_491_584),
        ("hunyuan_video_13b", 12_821_012_544),
    ],
)
def test_released_presets_count_their_published_sizes(preset, base):
    counts = parameter_counts(build_on_meta(model_preset(preset)), 16)
    assert counts.base == base
    assert counts.trainable("full") == counts.total == base + counts.new_modules


def test_bad_mode_and_precision_are_named():
    with pytest.raises(ValueError, match="mode='half'"):
        training_cost(ModelConfig(), (32, 32), 5, 4, "half")
    with pytest.raises(ValueError, match="precision='fp16'"):
        training_cost(ModelConfig(), (32, 32), 5, 4, "full", precision="fp16")


def test_mfu_counts_a_family_run_in_its_mode():
    from omni_train.trainer.throughput import flops_of_samples

    cfg = model_preset("hunyuan_video_tiny")
    ran = flops_of_samples(cfg, (32, 32), 5, [5, 5, 7], "lora", RANK)
    per_sample = {
        t: training_cost(cfg, (32, 32), 5, t, "lora", RANK, "fp32").train_flops for t in (5, 7)
    }
    assert ran == 2 * per_sample[5] + per_sample[7]


def test_a_pretrained_family_base_is_counted_from_its_config_without_loading(tmp_path):
    cfg = model_preset("wan_tiny")
    torch.manual_seed(0)
    build_denoiser(cfg).base.save_pretrained(tmp_path / "transformer")
    pretrained = dataclasses.replace(
        cfg,
        backbone=dataclasses.replace(cfg.backbone, pretrained=str(tmp_path), diffusers_config={}),
    )
    meta = build_on_meta(pretrained)
    assert all(p.is_meta for p in meta.parameters())
    assert parameter_counts(meta, RANK) == parameter_counts(build_on_meta(cfg), RANK)
    # The heads sequence parallelism splits, read from the same places without building.
    assert attention_heads(pretrained) == (2, "the Wan backbone's num_attention_heads")
    defaults = dataclasses.replace(cfg.backbone, diffusers_config={})
    assert attention_heads(dataclasses.replace(cfg, backbone=defaults))[0] == 40  # Wan2.1 14B
    assert attention_heads(model_preset("hunyuan_video_13b"))[0] == 24
    assert attention_heads(ModelConfig()) == (4, "model.dit.num_heads")
