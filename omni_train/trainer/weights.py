"""Export of trained weights to safetensors for inference, beside each checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from omni_train.models.config import ModelConfig
from omni_train.models.encoders import frozen_is_random
from omni_train.models.weights import save_safetensors
from omni_train.trainer.deepspeed_internals import zero3_full_state_dict

DENOISER_FILE = "model.safetensors"
# Random-init encoders cannot be rebuilt from a path: their weights travel with the run.
FROZEN_FILE = "frozen.safetensors"

__all__ = [
    "DENOISER_FILE",
    "FROZEN_FILE",
    "consolidated_state",
    "export_weights",
    "frozen_is_random",
]


def consolidated_state(
    engine, is_main: bool, trained_only: bool = False
) -> dict[str, torch.Tensor] | None:
    """The denoiser's full state dict on the main rank (None elsewhere); with
    ``trained_only``, its trainable parameters only (a frozen base stays where it is).

    Under ZeRO-3 the parameters are partitioned, so every rank must take part in gathering
    them; only the main rank receives them.
    """
    if engine.zero_optimization_partition_weights():
        state = zero3_full_state_dict(engine, exclude_frozen_parameters=trained_only)
    else:
        state = engine.module.state_dict() if is_main else None
    if not is_main or state is None:
        return None
    if trained_only:
        trained = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        return {name: value for name, value in state.items() if name in trained}
    return dict(state)


def export_weights(
    engine,
    encoders,
    model_cfg: ModelConfig,
    out_dir: Path,
    is_main: bool,
    state: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the denoiser's weights (and random-init encoders') into ``out_dir``: ``state``
    (from ``consolidated_state``: all of them, or what trained) with ``metadata`` in the
    file's header (where a frozen base is).

    Every rank must call it unless ``state`` is given.
    """
    if state is None:
        state = consolidated_state(engine, is_main)
    if not is_main:
        return
    save_safetensors(state, out_dir / DENOISER_FILE, metadata)
    if frozen_is_random(model_cfg):
        save_safetensors(encoders.state_dict(), out_dir / FROZEN_FILE)
