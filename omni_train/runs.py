"""Loading a trained run for inference: its checkpoint folder, its config (whose ``_target_``
entries are checked before anything is imported) and its denoiser and frozen encoders.
Used by the sample and evaluate CLIs and the benchmarks.

The model is rebuilt from the checkpoint's config.yaml, whose ``_target_`` entries (another
VAE or encoder, omni_train/models/adapters.py) are imported and called. Only this project's
code (``omni_train.*``, ``data_pipelines.*``) is accepted from a checkpoint unless
``trust_checkpoint_code=true`` is given, as for transformers' ``trust_remote_code``: a run
dir is trusted input, and one from elsewhere could name any function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from omni_train.config import TrainConfig, register_configs

log = logging.getLogger(__name__)
register_configs()

# The packages whose code a checkpoint's config.yaml may name without trust_checkpoint_code
# (conf/ names no third-party _target_).
PROJECT_PACKAGES: tuple[str, ...] = ("omni_train", "data_pipelines")
TRUST_FLAG = "trust_checkpoint_code=true"


class UntrustedCheckpointCode(ValueError):
    """A checkpoint's config.yaml names code outside this project."""


@dataclass
class LoadedRun:
    cfg: TrainConfig
    checkpoint: Path
    denoiser: torch.nn.Module
    encoders: torch.nn.Module


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder, or the newest complete one of a run dir."""
    from omni_train.trainer import checkpoint as ckpt

    path = Path(path)
    if (path / ckpt.COMPLETE_MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            latest = ckpt.latest_checkpoint(root)
            if latest is not None:
                return latest
    raise FileNotFoundError(
        f"checkpoint={path} is neither a complete checkpoint folder nor a run dir holding "
        "one: pass RUN_DIR or RUN_DIR/checkpoints/step_N"
    )


def config_targets(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a plain config container."""
    found = []
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                found.append((path, value))
            else:
                found += config_targets(value, path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += config_targets(value, f"{key}.{index}")
    return found


def _in_project(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in PROJECT_PACKAGES)


def check_checkpoint_targets(saved: Any, config_file: Path) -> None:
    """Raise UntrustedCheckpointCode unless every non-empty ``_target_`` in ``saved`` names
    this project's code. Other targets are refused before anything is imported; a project path
    is then resolved (importing project modules only) and must name an object defined in the
    project, so ``omni_train.sample.torch.load`` is refused as well."""
    from hydra.utils import get_object

    for key, target in config_targets(OmegaConf.to_container(saved, resolve=True)):
        if target in ("", None):
            continue
        named = str(target)
        if _in_project(named):
            try:
                defined_in = getattr(get_object(named), "__module__", None) or ""
            except Exception:  # noqa: BLE001 - unresolvable: building the part reports it
                continue
            if _in_project(defined_in):
                continue
            named = f"{target} (defined in {defined_in or 'an unknown module'})"
        raise UntrustedCheckpointCode(
            f"{config_file}: {key}={named!r} is not code of this project "
            f"({', '.join(p + '.*' for p in PROJECT_PACKAGES)}), and loading the checkpoint "
            f"would import and call it. If you trust this run dir, pass {TRUST_FLAG}"
        )


def read_run_config(folder: Path, trust_checkpoint_code: bool = False) -> TrainConfig:
    """The TrainConfig of a checkpoint folder, its ``_target_`` entries checked unless
    ``trust_checkpoint_code``."""
    config_file = folder / "config.yaml"
    saved = OmegaConf.load(config_file)
    if not trust_checkpoint_code:
        check_checkpoint_targets(saved, config_file)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))


def load_run(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = False,
    trust_checkpoint_code: bool = False,
) -> LoadedRun:
    """Rebuild the denoiser and frozen encoders of a checkpoint from its exported weights.

    The ``_target_`` entries of its config.yaml must name this project's code unless
    ``trust_checkpoint_code`` (UntrustedCheckpointCode otherwise)."""
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.models.weights import load_state_dict_file, load_strict
    from omni_train.trainer.ema import EMA_FILE
    from omni_train.trainer.finetune import build_finetuned_denoiser, freezes_base, load_trained
    from omni_train.trainer.weights import DENOISER_FILE, FROZEN_FILE

    folder = resolve_checkpoint(checkpoint)
    cfg = read_run_config(folder, trust_checkpoint_code)
    encoders = build_frozen_encoders(cfg.model)
    if (folder / FROZEN_FILE).is_file():
        load_strict(encoders, folder / FROZEN_FILE, what="frozen encoders")
    weights = folder / (EMA_FILE if use_ema else DENOISER_FILE)
    if use_ema and not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has no {EMA_FILE}: the run trained without trainer.ema.enabled=true; "
            "sample without use_ema=true"
        )
    what = "EMA denoiser" if use_ema else "denoiser"
    finetune = cfg.trainer.finetune
    if freezes_base(finetune):
        # The checkpoint holds what trained; the base comes from where model.safetensors says.
        base = base_of_checkpoint(folder)
        denoiser = build_finetuned_denoiser(cfg.model, finetune, base)
        load_trained(denoiser, load_state_dict_file(weights), f"{what} weights {weights}")
    else:
        denoiser = build_finetuned_denoiser(cfg.model, finetune)
        load_strict(denoiser, weights, what=what)
    return LoadedRun(cfg, folder, denoiser.to(device).eval(), encoders.to(device).eval())


def base_of_checkpoint(folder: Path) -> Path | None:
    """The base weights file a frozen-base checkpoint names (None: the run's
    model.backbone.pretrained, which building the denoiser loads)."""
    from omni_train.models.weights import read_metadata
    from omni_train.trainer.finetune import BASE_FROM_KEY, BASE_KEY, FROM_RUN_DIR
    from omni_train.trainer.weights import DENOISER_FILE

    metadata = read_metadata(folder / DENOISER_FILE)
    if BASE_KEY not in metadata:
        raise ValueError(
            f"{folder / DENOISER_FILE} names no base ({BASE_KEY} in its metadata), but the run "
            "trained with a frozen base (trainer.finetune.mode): it was not written by this "
            "trainer"
        )
    if metadata.get(BASE_FROM_KEY) == FROM_RUN_DIR:
        return (folder / metadata[BASE_KEY]).resolve()
    return None


def merged_state(run: LoadedRun) -> dict[str, torch.Tensor]:
    """The loaded denoiser's weights as a plain ``build_denoiser(cfg.model)`` takes them: LoRA
    adapters folded into their base weights (trainer.finetune.mode=lora); other modes' state
    dicts already are plain."""
    from omni_train.models.finetune import lora_scaling, merge_lora

    finetune = run.cfg.trainer.finetune
    state = run.denoiser.state_dict()
    if finetune.mode != "lora":
        return dict(state)
    return merge_lora(state, lora_scaling(finetune.lora_rank, finetune.lora_alpha))


def export_merged(
    checkpoint: str | Path,
    out: str | Path,
    use_ema: bool = False,
    dtype: str = "float32",
    trust_checkpoint_code: bool = False,
) -> Path:
    """Write a checkpoint's denoiser, adapters merged, as one safetensors file that a plain
    ``build_denoiser`` loads strictly (no peft needed); its header holds the model config."""
    from omni_train.models.weights import export_for_inference

    run = load_run(checkpoint, use_ema=use_ema, trust_checkpoint_code=trust_checkpoint_code)
    metadata = {
        "checkpoint": str(run.checkpoint),
        "weights": "ema" if use_ema else "model",
        "model_config": OmegaConf.to_yaml(OmegaConf.structured(run.cfg.model)),
    }
    return export_for_inference(merged_state(run), out, dtype, metadata)
