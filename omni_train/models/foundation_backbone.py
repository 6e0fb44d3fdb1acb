"""Public video transformers from diffusers as the base of an omni denoiser.

``model.backbone.family=wan|hunyuan_video`` builds the family's diffusers transformer: from a
local diffusers directory (``model.backbone.pretrained``: the transformer's own, or a whole
pipeline's, whose ``transformer/`` is used) or, without one, at random init from the class
defaults updated by ``model.backbone.diffusers_config``. The family's wrapper
(wan_denoiser.py, hunyuan_denoiser.py) keeps it as ``self.base`` and adds the omni modules.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from omni_train.models.config import BackboneConfig
from omni_train.models.diffusers_loading import (
    diffusers_class,
    load_diffusers_model,
    model_directory,
)


def load_diffusers_transformer(class_name: str, cfg: BackboneConfig) -> nn.Module:
    """The transformer of ``model.backbone.pretrained``, or a random-init one."""
    return load_diffusers_model(
        class_name,
        cfg.pretrained,
        cfg.diffusers_config,
        subfolder="transformer",
        key="model.backbone",
        wrong_class_hint=(
            "set model.backbone.family to the family of that checkpoint (or model= its preset)"
        ),
    )


def transformer_config_value(class_name: str, cfg: BackboneConfig, key: str) -> Any:
    """One config value of the family's transformer without building it: the pretrained
    directory's config.json, else model.backbone.diffusers_config, else the class default."""
    if cfg.pretrained:
        directory, subfolder = transformer_directory(cfg.pretrained)
        saved = json.loads((directory / (subfolder or "") / "config.json").read_text())
        if key in saved:
            return saved[key]
    if key in cfg.diffusers_config:
        return cfg.diffusers_config[key]
    return inspect.signature(diffusers_class(class_name).__init__).parameters[key].default


def transformer_directory(pretrained: str) -> tuple[Path, str | None]:
    """(directory, subfolder) of a diffusers transformer: its own directory, or a pipeline's."""
    return model_directory(pretrained, "transformer", "model.backbone")


def modules_outside_base(wrapper: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of everything a wrapper adds around its ``base``: its own
    parameters and every child but the base (the omni-condition modules)."""
    return tuple(
        [name for name, _ in wrapper.named_parameters(recurse=False)]
        + [f"{name}." for name, _ in wrapper.named_children() if name != "base"]
    )
