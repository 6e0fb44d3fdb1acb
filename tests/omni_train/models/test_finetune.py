"""Fine-tuning modes on the tiny denoiser: which parameters train, where LoRA goes, and that
the merged weights compute what the adapted model computes."""

from __future__ import annotations

import pytest
import torch

from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.finetune import (
    apply_finetune_mode,
    lora_scaling,
    merge_lora,
    trained_names,
)
from omni_train.models.weights import load_strict
from omni_train.testing import denoiser_inputs, pretrained_like

RANK, ALPHA = 4, 8.0  # scaling 2: a merge that forgets it is off by a factor of 2
# The tiny model's (depth 2) new modules: what a text-to-video MMDiT does not have.
NEW_MODULE_TENSORS = 37
# Its attention and MLP linears. The last block's text stream ends at its qkv: its output
# feeds nothing, so it has no attention output or MLP.
LORA_LAYERS = [
    *(f"backbone.blocks.0.{s}.{n}" for s in ("text", "video") for n in ("qkv", "attn_out", "mlp.0", "mlp.2")),
    "backbone.blocks.1.text.qkv",
    *(f"backbone.blocks.1.video.{n}" for n in ("qkv", "attn_out", "mlp.0", "mlp.2")),
]  # fmt: skip


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return pretrained_like(build_denoiser(ModelConfig())).eval()


def adapted(base: torch.nn.Module, mode: str = "lora") -> torch.nn.Module:
    model = build_denoiser(ModelConfig())
    model.load_state_dict(base.state_dict())
    return apply_finetune_mode(model, mode, RANK, ALPHA, 0.0).eval()


def forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**denoiser_inputs(ModelConfig(), seed=3))


def test_new_modules_mode_trains_the_new_modules_only():
    model = adapted(base_model(), "new_modules")
    names = trained_names(model)
    prefixes = (
        "audio_projector.",
        "null_audio",
        "null_reference",
        "motion_embedding",
        "pose_guider.",
        "pose_patch_embed.",
        "backbone.blocks.0.audio_attn.",
        "backbone.blocks.1.audio_attn.",
    )
    assert len(names) == NEW_MODULE_TENSORS
    assert all(name.startswith(prefixes) for name in names)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert not any(name.startswith(prefixes) for name in frozen)
    assert "backbone.blocks.0.video.qkv.weight" in frozen and "null_text" in frozen


def test_full_mode_leaves_the_model_as_built():
    model = adapted(base_model(), "full")
    assert trained_names(model) == [name for name, _ in model.named_parameters()]
    assert not any("lora" in name for name in trained_names(model))


def test_lora_adapts_exactly_the_attention_and_mlp_linears():
    model = adapted(base_model())
    names = trained_names(model)
    lora = [name for name in names if ".lora_" in name]
    assert lora == [f"{layer}.lora_{f}.default.weight" for layer in LORA_LAYERS for f in "AB"]
    assert len(names) == len(lora) + NEW_MODULE_TENSORS
    params = dict(model.named_parameters())
    qkv = "backbone.blocks.0.video.qkv"
    assert params[f"{qkv}.lora_A.default.weight"].shape == (RANK, 64)
    assert params[f"{qkv}.lora_B.default.weight"].shape == (192, RANK)
    assert not params[f"{qkv}.base_layer.weight"].requires_grad
    # B starts at zero, A does not: the first update moves B, and the output with it.
    for layer in LORA_LAYERS:
        assert not params[f"{layer}.lora_B.default.weight"].any(), layer
        assert params[f"{layer}.lora_A.default.weight"].abs().sum() > 0, layer


def test_lora_starts_as_the_base_exactly():
    base = base_model()
    assert torch.equal(forward(adapted(base)), forward(base))


def test_merged_weights_compute_what_the_adapted_model_computes():
    base = base_model()
    model = adapted(base)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    out = forward(model)
    assert (out - forward(base)).abs().max() > 1e-2  # the adapters change the output

    merged = merge_lora(model.state_dict(), lora_scaling(RANK, ALPHA))
    plain = load_strict(build_denoiser(ModelConfig()), merged, "merged").eval()
    torch.testing.assert_close(forward(plain), out, rtol=1e-5, atol=1e-6)
    # The frozen base is unchanged by merging another copy: only adapted weights differ.
    base_state = base.state_dict()
    changed = sorted(
        {k.rsplit(".", 1)[0] for k in merged if not torch.equal(merged[k], base_state[k])}
    )
    assert changed == sorted(LORA_LAYERS)


def test_merge_refuses_half_an_adapter():
    model = adapted(base_model())
    state = model.state_dict()
    del state["backbone.blocks.0.video.qkv.lora_B.default.weight"]
    with pytest.raises(ValueError, match=r"backbone.blocks.0.video.qkv: needs lora_A, lora_B"):
        merge_lora(state, 2.0)


def test_bad_modes_and_targets_are_refused():
    model = build_denoiser(ModelConfig())
    with pytest.raises(
        ValueError, match=r"mode='qlora' is not one of \('full', 'new_modules', 'lora'\)"
    ):
        apply_finetune_mode(model, "qlora")
    model.lora_target_modules = r"backbone\.nothing"
    with pytest.raises(ValueError, match=r"LoRA could not adapt OmniDenoiser .*not found"):
        apply_finetune_mode(model, "lora", RANK, ALPHA)
