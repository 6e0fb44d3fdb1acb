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

from torch import nn

from omni_train.models.config import BackboneConfig
from omni_train.models.foundation_vae import diffusers_class

TRANSFORMER_SUBFOLDER = "transformer"


def transformer_directory(pretrained: str) -> tuple[Path, str | None]:
    """(directory, subfolder) of a diffusers transformer: its own directory, or a pipeline's."""
    path = Path(pretrained)
    if (path / "config.json").is_file():
        return path, None
    if (path / TRANSFORMER_SUBFOLDER / "config.json").is_file():
        return path, TRANSFORMER_SUBFOLDER
    raise FileNotFoundError(
        f"model.backbone.pretrained={pretrained}: neither {path / 'config.json'} nor "
        f"{path / TRANSFORMER_SUBFOLDER / 'config.json'} exists; give a local diffusers "
        "directory (a transformer saved with save_pretrained, or a whole pipeline with a "
        "transformer/ subfolder)"
    )


def load_diffusers_transformer(class_name: str, cfg: BackboneConfig) -> nn.Module:
    """The transformer of ``model.backbone.pretrained``, or a random-init one."""
    model_class = diffusers_class(class_name)
    overrides = dict(cfg.diffusers_config)
    if not cfg.pretrained:
        accepted = set(inspect.signature(model_class.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise ValueError(
                f"model.backbone.diffusers_config has {unknown}, which {class_name} does not "
                f"take; its arguments are {sorted(accepted)}"
            )
        return model_class(**overrides)
    if overrides:
        raise ValueError(
            f"model.backbone.diffusers_config={overrides} only shapes a random-init backbone, "
            f"but model.backbone.pretrained={cfg.pretrained} brings its own config; drop one"
        )
    directory, subfolder = transformer_directory(cfg.pretrained)
    config_file = directory / (subfolder or "") / "config.json"
    saved_class = json.loads(config_file.read_text()).get("_class_name")
    if saved_class != class_name:
        raise ValueError(
            f"{config_file} is the config of {saved_class}, not of the {class_name} this family "
            "wraps; set model.backbone.family to the family of that checkpoint (or model= its "
            "preset)"
        )
    return model_class.from_pretrained(directory, subfolder=subfolder, local_files_only=True)
