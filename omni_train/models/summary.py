"""What a model config amounts to: parameters per component and per fine-tuning mode, and
training FLOPs per sample.

The model is built on the meta device, so a 14B preset is counted exactly without allocating
its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from omni_train.models.config import ModelConfig
from omni_train.models.finetune import FINETUNE_MODES
from omni_train.models.flops import flop_breakdown, token_counts
from omni_train.models.training_cost import (
    block_counts,
    build_on_meta,
    default_lora_rank,
    parameter_counts,
    training_cost,
)

# Denoiser parameters by component: the first rule whose prefix matches a name wins.
AUDIO_PREFIXES = ("audio_projector.", "null_audio", "audio_attn.", "backbone.blocks.*.audio_attn.")
POSE_PREFIXES = ("pose_guider.", "pose_patch_embed.")
DENOISER_COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("audio", AUDIO_PREFIXES),
    ("pose_guider", POSE_PREFIXES),
    ("text_stream", ("text_proj.", "null_text", "backbone.blocks.*.text.")),
    ("video_stream", ("",)),
)
# A family's: its diffusers transformer, then the omni modules around it.
FAMILY_COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("base.",)),
    ("audio", AUDIO_PREFIXES),
    ("pose_guider", POSE_PREFIXES),
    ("other_new", ("",)),
)
FROZEN_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("vae", "vae"),
    ("text_encoder", "text"),
    ("audio_encoder", "audio"),
)


def _matches(name: str, pattern: str) -> bool:
    if "*" not in pattern:
        return name.startswith(pattern)
    head, tail = pattern.split("*", 1)
    if not name.startswith(head):
        return False
    rest = name[len(head) :]
    index, _, after = rest.partition(".")
    return index.isdigit() and f".{after}".startswith(tail)


def denoiser_component(name: str, family: str = "") -> str:
    """The component a denoiser parameter belongs to: text/video stream, audio, pose guider
    (this project's MMDiT); base, audio, pose guider, other new modules (a family)."""
    for component, patterns in FAMILY_COMPONENTS if family else DENOISER_COMPONENTS:
        if any(_matches(name, pattern) for pattern in patterns):
            return component
    raise AssertionError("the last rule matches every name")


def denoiser_parameter_counts(denoiser: nn.Module, family: str = "") -> dict[str, int]:
    rules = FAMILY_COMPONENTS if family else DENOISER_COMPONENTS
    counts = dict.fromkeys((name for name, _ in rules), 0)
    for name, param in denoiser.named_parameters():
        counts[denoiser_component(name, family)] += param.numel()
    return counts


def build_encoders_on_meta(cfg: ModelConfig) -> nn.Module:
    """The frozen encoders with shapes but no storage; pretrained paths are ignored."""
    from omni_train.models.encoders import build_frozen_encoders

    shapes_only = replace(
        cfg,
        vae=replace(cfg.vae, pretrained=""),
        text_encoder=replace(cfg.text_encoder, pretrained=""),
        audio_encoder=replace(cfg.audio_encoder, pretrained=""),
    )
    with torch.device("meta"):
        return build_frozen_encoders(shapes_only)


def encoder_parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    encoders = build_encoders_on_meta(cfg)
    return {
        name: sum(p.numel() for p in getattr(encoders, attribute).parameters())
        for name, attribute in FROZEN_COMPONENTS
    }


def architecture(cfg: ModelConfig, denoiser: nn.Module) -> dict[str, Any]:
    """The shape of the denoiser's transformer: blocks of each kind, width and heads."""
    if not cfg.backbone.family:
        dit = cfg.dit
        return {
            "class": "MMDiT",
            "blocks": block_counts(cfg, denoiser),
            "hidden": dit.hidden_size,
            "heads": dit.num_heads,
            "head_dim": dit.hidden_size // dit.num_heads,
        }
    config = denoiser.base.config
    return {
        "class": type(denoiser.base).__name__,
        "blocks": block_counts(cfg, denoiser),
        "hidden": config.num_attention_heads * config.attention_head_dim,
        "heads": config.num_attention_heads,
        "head_dim": config.attention_head_dim,
    }


def model_summary(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
    mode: str = "full",
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """Parameter counts (per component, trainable vs frozen, per fine-tuning mode) and the
    training FLOPs per sample of ``mode``: this project's MMDiT in full by component (the
    closed form of flops.py), anything else counted (training_cost.py)."""
    family = cfg.backbone.family
    tokens = token_counts(cfg, resolution, num_frames, text_tokens)
    denoiser = build_on_meta(cfg, False)
    params = parameter_counts(denoiser, default_lora_rank() if lora_rank is None else lora_rank)
    prefixes = tuple(denoiser.new_module_prefixes)
    trains = mode == "full"
    components: dict[str, dict[str, int]] = {}
    for name, count in denoiser_parameter_counts(denoiser, family).items():
        components[name] = {"params": count, "trainable": count}
    if not trains:
        for name in components:
            components[name]["trainable"] = 0
        for name, param in denoiser.named_parameters():
            if name.startswith(prefixes):
                components[denoiser_component(name, family)]["trainable"] += param.numel()
        if mode == "lora":
            components["lora_adapters"] = {
                "params": params.lora_adapters,
                "trainable": params.lora_adapters,
            }
    for name, count in encoder_parameter_counts(cfg).items():
        components[name] = {"params": count, "trainable": 0}
    trainable = sum(part["trainable"] for part in components.values())
    total = sum(part["params"] for part in components.values())
    if not family and trains:
        flops = {
            name: {"forward": part.forward, "backward": part.backward, "train": part.train}
            for name, part in flop_breakdown(cfg, resolution, num_frames, text_tokens).items()
        }
    else:
        cost = training_cost(cfg, resolution, num_frames, text_tokens, mode, params.lora_rank)
        flops = {
            "denoiser": {
                "forward": cost.forward_flops,
                "backward": cost.train_flops - cost.forward_flops,
                "train": cost.train_flops,
            }
        }
    return {
        "model": cfg.name,
        "backbone": family,
        "architecture": architecture(cfg, denoiser),
        "finetune_mode": mode,
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "components": components,
        "parameters": {
            "total": params.total,
            "base": params.base,
            "new_modules": params.new_modules,
            "lora_adapters": params.lora_adapters,
            "lora_rank": params.lora_rank,
            "trainable": {m: params.trainable(m) for m in FINETUNE_MODES},
        },
        "resolution": [int(v) for v in resolution],
        "num_frames": int(num_frames),
        "tokens": {**asdict(tokens), "video_tokens": tokens.video_tokens},
        "train_flops_per_sample": sum(part["train"] for part in flops.values()),
        "forward_flops_per_sample": sum(part["forward"] for part in flops.values()),
        "flops": flops,
    }
