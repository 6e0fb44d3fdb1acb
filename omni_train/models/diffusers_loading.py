"""Build a diffusers model of a given class: from a local diffusers directory (the model's own,
as save_pretrained writes it, or a whole pipeline's, whose subfolder for that part is used) or,
without one, at random init from the class defaults updated by a config dict. Errors name the
Hydra override to change (``key``: e.g. model.vae or model.backbone)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

INSTALL_HINT = "install the foundation extra: .venv/bin/pip install -e '.[foundation]'"


def diffusers_class(name: str) -> type[nn.Module]:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            f"{name} comes from diffusers, which is not installed; {INSTALL_HINT}"
        ) from err
    return getattr(diffusers, name)


def model_directory(pretrained: str, subfolder: str, key: str) -> tuple[Path, str | None]:
    """(directory, subfolder) of a diffusers model: its own directory, or a pipeline's."""
    path = Path(pretrained)
    if (path / "config.json").is_file():
        return path, None
    if (path / subfolder / "config.json").is_file():
        return path, subfolder
    raise FileNotFoundError(
        f"{key}.pretrained={pretrained}: neither {path / 'config.json'} nor "
        f"{path / subfolder / 'config.json'} exists; give a local diffusers directory (a model "
        f"saved with save_pretrained, or a whole pipeline with a {subfolder}/ subfolder)"
    )


def load_diffusers_model(
    class_name: str,
    pretrained: str,
    diffusers_config: Mapping[str, Any],
    subfolder: str,
    key: str,
    wrong_class_hint: str,
) -> nn.Module:
    """The model in ``pretrained``, or a random-init one from ``diffusers_config``."""
    model_class = diffusers_class(class_name)
    overrides = dict(diffusers_config)
    if not pretrained:
        accepted = set(inspect.signature(model_class.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise ValueError(
                f"{key}.diffusers_config has {unknown}, which {class_name} does not take; "
                f"its arguments are {sorted(accepted)}"
            )
        return model_class(**overrides)
    if overrides:
        raise ValueError(
            f"{key}.diffusers_config={overrides} only shapes a random-init model, but "
            f"{key}.pretrained={pretrained} brings its own config; drop one of them"
        )
    directory, found = model_directory(pretrained, subfolder, key)
    config_file = directory / (found or "") / "config.json"
    saved_class = json.loads(config_file.read_text()).get("_class_name")
    if saved_class != class_name:
        raise ValueError(
            f"{config_file} is the config of {saved_class}, not of the {class_name} this "
            f"{key} wraps; {wrong_class_hint}"
        )
    return model_class.from_pretrained(directory, subfolder=found, local_files_only=True)
