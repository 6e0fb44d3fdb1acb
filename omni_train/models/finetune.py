"""Fine-tuning a pretrained denoiser: which parameters train, LoRA adapters, and folding them back.

Every denoiser names two sets of its parameters (omni_train/models/denoiser.py):
``new_module_prefixes`` (the omni-condition modules a text-to-video base lacks) and
``lora_target_modules`` (a regex fully matching the module names of the base's attention and
MLP linears). The modes:

  full          every parameter trains
  new_modules   the base is frozen; only the new modules train
  lora          the base is frozen; LoRA adapters (peft) on the target linears and the new
                modules train

peft wraps each target ``nn.Linear`` as ``NAME.base_layer`` with ``NAME.lora_A.default`` and
``NAME.lora_B.default`` beside it; its forward is ``base(x) + B(A(x)) * alpha / rank``.
``merge_lora`` folds that sum into one weight, giving the state dict of the plain model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

FINETUNE_MODES: tuple[str, ...] = ("full", "new_modules", "lora")
# peft's name of the one adapter injected here.
ADAPTER = "default"
_LORA_KEY = re.compile(rf"^(?P<layer>.+)\.lora_(?P<factor>[AB])\.{ADAPTER}\.weight$")
_BASE_KEY = re.compile(r"^(?P<layer>.+)\.base_layer\.(?P<kind>weight|bias)$")


def is_new_module(name: str, model: nn.Module) -> bool:
    return name.startswith(tuple(model.new_module_prefixes))


def is_lora_parameter(name: str) -> bool:
    return _LORA_KEY.match(name) is not None


def trained_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train (requires_grad), in module order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def lora_scaling(rank: int, alpha: float) -> float:
    """peft's factor of the adapter's output (plain LoRA, not rsLoRA)."""
    return alpha / rank


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap the model's ``lora_target_modules`` with LoRA adapters of ``rank`` (in place).

    lora_A starts at peft's Kaiming init (drawn from torch's global generator), lora_B at zero,
    so the adapted model computes exactly what the base does until B is trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=model.lora_target_modules,
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(
            f"LoRA could not adapt {type(model).__name__} (its lora_target_modules="
            f"{model.lora_target_modules!r} must fully match the names of its base's "
            f"attention and MLP linears): {err}"
        ) from err
    return model


def apply_finetune_mode(
    model: nn.Module,
    mode: str,
    lora_rank: int = 16,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Set which parameters of ``model`` train for ``mode`` (in place; see the module doc).
    ``full`` leaves the model as built."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune mode={mode!r} is not one of {FINETUNE_MODES}")
    if mode == "full":
        return model
    if mode == "lora":
        inject_lora(model, lora_rank, lora_alpha, lora_dropout)
    for name, param in model.named_parameters():
        param.requires_grad_(is_new_module(name, model) or is_lora_parameter(name))
    return model


@torch.no_grad()
def merge_lora(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted one: ``W = W_base + scaling * B @ A``
    (computed in fp32, stored in the base weight's dtype); keys without adapters pass through."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        lora = _LORA_KEY.match(key)
        if lora:
            factors.setdefault(lora["layer"], {})[lora["factor"]] = value
            continue
        if ".lora_" in key:
            raise ValueError(f"{key}: only plain LoRA adapters ({ADAPTER}) can be merged")
        base = _BASE_KEY.match(key)
        merged[f"{base['layer']}.{base['kind']}" if base else key] = value
    for layer, pair in factors.items():
        weight_key = f"{layer}.weight"
        if set(pair) != {"A", "B"} or weight_key not in merged:
            raise ValueError(f"{layer}: needs lora_A, lora_B and base_layer.weight to merge")
        base = merged[weight_key]
        delta = pair["B"].float() @ pair["A"].float()
        merged[weight_key] = (base.float() + scaling * delta).to(base.dtype)
    return merged
