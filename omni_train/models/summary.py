"""What a model config amounts to: parameters per component and training FLOPs per sample.

The model is built on the meta device, so a 7B preset is counted exactly without allocating
its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from omni_train.models.config import ModelConfig
from omni_train.models.flops import flop_breakdown, token_counts

# Denoiser parameters by component: the first rule whose prefix matches a name wins.
DENOISER_COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("audio", ("audio_projector.", "null_audio", "backbone.blocks.*.audio_attn.")),
    ("pose_guider", ("pose_guider.", "pose_patch_embed.")),
    ("text_stream", ("text_proj.", "null_text", "backbone.blocks.*.text.")),
    ("video_stream", ("",)),
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


def denoiser_component(name: str) -> str:
    """The component a denoiser parameter belongs to (text/video stream, audio, pose guider)."""
    for component, patterns in DENOISER_COMPONENTS:
        if any(_matches(name, pattern) for pattern in patterns):
            return component
    raise AssertionError("the last rule matches every name")


def denoiser_parameter_counts(denoiser: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(("text_stream", "video_stream", "audio", "pose_guider"), 0)
    for name, param in denoiser.named_parameters():
        counts[denoiser_component(name)] += param.numel()
    return counts


def build_on_meta(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(denoiser, frozen encoders) with shapes but no storage; pretrained paths are ignored."""
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import FrozenEncoders, build_frozen_encoders

    shapes_only = replace(
        cfg,
        vae=replace(cfg.vae, pretrained=""),
        text_encoder=replace(cfg.text_encoder, pretrained=""),
        audio_encoder=replace(cfg.audio_encoder, pretrained=""),
    )
    with torch.device("meta"):
        denoiser = build_denoiser(cfg)
        encoders: FrozenEncoders = build_frozen_encoders(shapes_only)
    return denoiser, encoders


def model_summary(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
) -> dict[str, Any]:
    """Parameter counts (per component, trainable vs frozen) and training FLOPs per sample."""
    denoiser, encoders = build_on_meta(cfg)
    components: dict[str, dict[str, int]] = {
        name: {"params": count, "trainable": count}
        for name, count in denoiser_parameter_counts(denoiser).items()
    }
    for name, attribute in FROZEN_COMPONENTS:
        count = sum(p.numel() for p in getattr(encoders, attribute).parameters())
        components[name] = {"params": count, "trainable": 0}
    trainable = sum(part["trainable"] for part in components.values())
    total = sum(part["params"] for part in components.values())
    tokens = token_counts(cfg, resolution, num_frames, text_tokens)
    flops = flop_breakdown(cfg, resolution, num_frames, text_tokens)
    return {
        "model": cfg.name,
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "components": components,
        "resolution": [int(v) for v in resolution],
        "num_frames": int(num_frames),
        "tokens": {**asdict(tokens), "video_tokens": tokens.video_tokens},
        "train_flops_per_sample": sum(part.train for part in flops.values()),
        "forward_flops_per_sample": sum(part.forward for part in flops.values()),
        "flops": {
            name: {"forward": part.forward, "backward": part.backward, "train": part.train}
            for name, part in flops.items()
        },
    }
