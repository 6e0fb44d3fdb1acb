"""Describe a model preset: parameters per component and training FLOPs per sample.

    python -m omni_train.describe model=7b [resolution=[480,832]] [num_frames=81] \
        [text_tokens=512] [format=json]

Nothing is allocated: the model is built on the meta device, so every preset describes in
about a second on any machine.
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

FORMATS: tuple[str, ...] = ("text", "json")
COMPONENT_TITLES = {
    "text_stream": "text stream",
    "video_stream": "video stream",
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


def render_text(summary: dict[str, Any], cfg: ModelConfig) -> str:
    dit = cfg.dit
    head_dim = dit.hidden_size // dit.num_heads
    lines = [
        f"model {summary['model']}: MMDiT depth {dit.depth}, hidden {dit.hidden_size}, "
        f"{dit.num_heads} heads x {head_dim}, mlp x{dit.mlp_ratio:g}, patch {dit.patch_size}, "
        f"{cfg.vae.latent_channels} latent channels",
        "",
        f"{'component':<38}{'params':>14}{'trainable':>14}",
    ]
    for name, part in summary["components"].items():
        title = COMPONENT_TITLES.get(name, name)
        if not part["trainable"]:
            title += " (frozen)"
        lines.append(f"{title:<38}{part['params']:>14,}{part['trainable']:>14,}")
    lines += [
        f"{'total':<38}{summary['total_params']:>14,}{summary['trainable_params']:>14,}",
        f"trainable {_count(summary['trainable_params'])}, "
        f"frozen {_count(summary['frozen_params'])}",
        "",
    ]
    tokens = summary["tokens"]
    height, width = summary["resolution"]
    lines += [
        f"training FLOPs per sample at {height}x{width}, {summary['num_frames']} frames "
        f"({tokens['latent_frames']} latent frames x {tokens['tokens_per_frame']} tokens "
        f"+ {tokens['reference_tokens']} reference tokens, {tokens['text_tokens']} text tokens):",
        f"{'component':<38}{'forward':>14}{'train':>14}",
    ]
    for name, part in summary["flops"].items():
        lines.append(f"{name:<38}{_flops(part['forward']):>14}{_flops(part['train']):>14}")
    lines.append(
        f"{'total':<38}{_flops(summary['forward_flops_per_sample']):>14}"
        f"{_flops(summary['train_flops_per_sample']):>14}"
    )
    lines.append("(fwd + bwd model FLOPs of the denoiser; frozen encoders run forward only)")
    return "\n".join(lines)


def describe(cfg: DescribeConfig) -> str:
    from omni_train.models.summary import model_summary

    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} not in {FORMATS}")
    if len(cfg.resolution) != 2:
        raise ValueError(f"resolution={cfg.resolution} must be [height, width]")
    summary = model_summary(cfg.model, cfg.resolution, cfg.num_frames, cfg.text_tokens or None)
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
