"""trainer.finetune: the optimizer's parameter groups per mode, and the base a frozen-base run
points to.

A run with a frozen base (mode new_modules or lora) checkpoints only what trains; its
model.safetensors names the base in its metadata (``base_metadata``): model.backbone.pretrained
when set, else the random-init base the run wrote once into its run dir (``BASE_FILE``, before
any adapter was injected). ``build_finetuned_denoiser`` rebuilds the trained model from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.finetune import (
    apply_finetune_mode,
    is_lora_parameter,
    is_new_module,
    trained_names,
)
from omni_train.models.weights import WeightsMismatch, load_strict, state_dict_diff
from omni_train.trainer.config import FinetuneConfig, OptimizerConfig

# The random-init base of a frozen-base run, in its run dir.
BASE_FILE = "base_model.safetensors"
# model.safetensors metadata of a frozen-base run.
MODE_KEY = "finetune_mode"
BASE_KEY = "base_model"
BASE_FROM_KEY = "base_model_from"
FROM_RUN_DIR = "run_dir"
FROM_PRETRAINED = "model.backbone.pretrained"


def freezes_base(finetune: FinetuneConfig) -> bool:
    return finetune.mode != "full"


def param_groups(model: nn.Module, opt: OptimizerConfig, mode: str) -> list[dict]:
    """The optimizer's groups of the trainable parameters: backbone (full mode only), lora
    (lora mode) and new_modules, each with its learning rate."""
    backbone, lora, new = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_new_module(name, model):
            new.append(param)
        elif is_lora_parameter(name):
            lora.append(param)
        else:
            backbone.append(param)
    if mode != "full" and backbone:
        raise ValueError(
            f"trainer.finetune.mode={mode} trains base parameters; it should train new modules "
            "and adapters only"
        )
    groups = []
    if mode == "full":
        groups.append({"params": backbone, "lr": opt.lr, "name": "backbone"})
    if lora:
        groups.append({"params": lora, "lr": opt.lr * opt.lora_lr_scale, "name": "lora"})
    if new:
        groups.append(
            {"params": new, "lr": opt.lr * opt.new_module_lr_scale, "name": "new_modules"}
        )
    if not any(group["params"] for group in groups):
        raise ValueError(
            f"trainer.finetune.mode={mode} leaves nothing to train in {type(model).__name__}"
        )
    return groups


def apply_finetune(model: nn.Module, finetune: FinetuneConfig) -> nn.Module:
    return apply_finetune_mode(
        model, finetune.mode, finetune.lora_rank, finetune.lora_alpha, finetune.lora_dropout
    )


def base_metadata(model_cfg: ModelConfig, finetune: FinetuneConfig) -> dict[str, str]:
    """model.safetensors metadata of a frozen-base run: the mode and where the base is (a
    run-dir base as a path relative to the checkpoint folder); {} in full mode."""
    if not freezes_base(finetune):
        return {}
    pretrained = model_cfg.backbone.pretrained
    if pretrained:
        return {MODE_KEY: finetune.mode, BASE_KEY: pretrained, BASE_FROM_KEY: FROM_PRETRAINED}
    return {MODE_KEY: finetune.mode, BASE_KEY: f"../../{BASE_FILE}", BASE_FROM_KEY: FROM_RUN_DIR}


def base_file(run_dir: Path) -> Path:
    return Path(run_dir) / BASE_FILE


def missing_base_error(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} was trained on a random-init base saved as {path}, which is missing: restore "
        "it (it is written once when such a run starts) or train anew"
    )


def load_base(model: nn.Module, path: Path, what: str) -> None:
    if not path.is_file():
        raise missing_base_error(path, what)
    load_strict(model, path, f"{what}'s base")


def build_finetuned_denoiser(
    model_cfg: ModelConfig, finetune: FinetuneConfig, base: Path | None = None
) -> nn.Module:
    """The denoiser as the trainer trains it: built (its model.backbone.pretrained loaded),
    ``base`` weights loaded when given, then the finetune mode applied."""
    denoiser = build_denoiser(model_cfg)
    if base is not None:
        load_base(denoiser, base, "the run")
    return apply_finetune(denoiser, finetune)


def load_trained(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a frozen-base checkpoint's tensors: exactly the model's trainable parameters."""
    params = dict(model.named_parameters())
    expected = {name: params[name] for name in trained_names(model)}
    diff = state_dict_diff(expected, state)
    if diff:
        raise WeightsMismatch(
            "\n".join([f"{what} does not match the model's trained part:", *diff])
        )
    model.load_state_dict(state, strict=False)


def check_resumed_mode(meta: dict, finetune: FinetuneConfig, checkpoint: Path) -> None:
    """A run resumes in the finetune mode it was saved in (complete.json names a frozen-base
    mode; no name = full)."""
    saved = meta.get(MODE_KEY, "full")
    if saved != finetune.mode:
        raise ValueError(
            f"{checkpoint} was saved with trainer.finetune.mode={saved}; this run asks for "
            f"trainer.finetune.mode={finetune.mode}. Resume with mode={saved}, or start a new "
            "run_dir from its weights (model.backbone.pretrained=CHECKPOINT/model.safetensors "
            "after a merged export for a frozen-base run: python -m omni_train.export_merged)"
        )
