"""Describe a model preset: parameters per component and training FLOPs per sample.

    python -m omni_train.describe model=7b [resolution=[480,832]] [num_frames=81] \
        [text_tokens=512] [finetune.mode=full|new_modules|lora] [finetune.lora_rank=16] \
        [format=json]

Nothing is allocated: the model is built on the meta device, so every preset describes in
seconds on any machine (a family backbone's FLOPs, and a frozen-base mode's, are counted by
running one sample through it on meta tensors, omni_train/models/training_cost.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from omni_train.models.config import ModelConfig
from omni_train.trainer.config import FinetuneConfig

FORMATS: tuple[str, ...] = ("text", "json")
COMPONENT_TITLES = {
    "base": "base transformer",
    "text_stream": "text stream",
    "video_stream": "video stream",
    "other_new": "motion, learned nulls",
    "lora_adapters": "LoRA adapters",
    "audio": "audio (projector, cross-attention)",
    "pose_guider": "pose guider",
    "vae": "VAE",
    "text_encoder": "text encoder",
    "audio_encoder": "audio encoder",
}


@dataclass
class DescribeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # Training clip: (height, width) pixels and pixel frames (1 + 4k).
    resolution: list[int] = field(default_factory=lambda: [480, 832])
    num_frames: int = 81
    # Padded caption tokens per sample; 0 = model.text_encoder.max_length.
    text_tokens: int = 0
    # Which parameters train (trainer.finetune's modes): the FLOPs are those of this mode.
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    format: str = "text"


def register_configs() -> None:
    ConfigStore.instance().store(name="describe_schema", node=DescribeConfig)


def model_preset(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The ModelConfig of conf/model/NAME.yaml (with ``model.*`` overrides), composed in-process."""
    from hydra import compose, initialize_config_dir

    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        raw = compose(config_name="describe", overrides=[f"model={name}", *overrides])
    return OmegaConf.to_object(raw).model


def _count(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


# How the config keys counting a transformer's blocks read (training_cost.BLOCK_KEYS).
BLOCK_TITLES = {
    ("", "depth"): "blocks",
    ("wan", "num_layers"): "blocks",
    ("hunyuan_video", "num_layers"): "dual-stream blocks",
    ("hunyuan_video", "num_single_layers"): "single-stream blocks",
}


def _architecture_line(summary: dict[str, Any], cfg: ModelConfig) -> str:
    arch = summary["architecture"]
    blocks = " + ".join(
        f"{n} {BLOCK_TITLES.get((summary['backbone'], key), key)}"
        for key, n in arch["blocks"].items()
    )
    shape = f"hidden {arch['hidden']}, {arch['heads']} heads x {arch['head_dim']}"
    if not summary["backbone"]:
        dit = cfg.dit
        return (
            f"model {summary['model']}: MMDiT depth {dit.depth}, {shape}, mlp x{dit.mlp_ratio:g}, "
            f"patch {dit.patch_size}, {cfg.vae.latent_channels} latent channels"
        )
    return (
        f"model {summary['model']}: {summary['backbone']} backbone ({arch['class']}: {blocks}, "
        f"{shape}), {cfg.vae.latent_channels} latent channels"
    )


def render_text(summary: dict[str, Any], cfg: ModelConfig) -> str:
    mode = summary["finetune_mode"]
    lines = [
        _architecture_line(summary, cfg),
        "",
        f"{'component':<38}{'params':>16}{'trainable':>16}   ({mode})",
    ]
    for name, part in summary["components"].items():
        title = COMPONENT_TITLES.get(name, name)
        if not part["trainable"]:
            title += " (frozen)"
        lines.append(f"{title:<38}{part['params']:>16,}{part['trainable']:>16,}")
    lines += [
        f"{'total':<38}{summary['total_params']:>16,}{summary['trainable_params']:>16,}",
        f"trainable {_count(summary['trainable_params'])}, "
        f"frozen {_count(summary['frozen_params'])}",
        "",
    ]
    params = summary["parameters"]
    lines += [
        f"denoiser {_count(params['total'])}: base {_count(params['base'])}, new modules "
        f"{_count(params['new_modules'])}, LoRA adapters at rank {params['lora_rank']} "
        f"{_count(params['lora_adapters'])}",
        f"{'fine-tuning mode':<38}{'trainable':>16}{'frozen':>16}",
    ]
    for name, trainable in params["trainable"].items():
        frozen = params["base"] if name != "full" else 0
        lines.append(f"{name:<38}{trainable:>16,}{frozen:>16,}")
    lines.append("")
    tokens = summary["tokens"]
    height, width = summary["resolution"]
    lines += [
        f"training FLOPs per sample ({mode}) at {height}x{width}, {summary['num_frames']} frames "
        f"({tokens['latent_frames']} latent frames x {tokens['tokens_per_frame']} tokens "
        f"+ {tokens['reference_tokens']} reference tokens, {tokens['text_tokens']} text tokens):",
        f"{'component':<38}{'forward':>16}{'train':>16}",
    ]
    for name, part in summary["flops"].items():
        lines.append(f"{name:<38}{_flops(part['forward']):>16}{_flops(part['train']):>16}")
    lines.append(
        f"{'total':<38}{_flops(summary['forward_flops_per_sample']):>16}"
        f"{_flops(summary['train_flops_per_sample']):>16}"
    )
    lines.append("(fwd + bwd model FLOPs of the denoiser; frozen encoders run forward only)")
    return "\n".join(lines)


def describe(cfg: DescribeConfig) -> str:
    from omni_train.models.summary import model_summary

    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} not in {FORMATS}")
    if len(cfg.resolution) != 2:
        raise ValueError(f"resolution={cfg.resolution} must be [height, width]")
    summary = model_summary(
        cfg.model,
        cfg.resolution,
        cfg.num_frames,
        cfg.text_tokens or None,
        cfg.finetune.mode,
        cfg.finetune.lora_rank,
    )
    if cfg.format == "json":
        return json.dumps(summary)
    return render_text(summary, cfg.model)


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="describe")
def main(raw: DictConfig) -> None:
    cfg: DescribeConfig = OmegaConf.to_object(raw)
    try:
        print(describe(cfg))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
