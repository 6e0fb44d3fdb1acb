"""Learning-rate multiplier per optimizer step: linear warmup, then constant/cosine/linear."""

from __future__ import annotations

import math
from collections.abc import Callable

from omni_train.trainer.config import OptimizerConfig

SCHEDULES = ("constant", "cosine", "linear")


def validate_schedule(cfg: OptimizerConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"trainer.optimizer.schedule={cfg.schedule!r}: use one of {', '.join(SCHEDULES)}"
        )
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            f"trainer.optimizer.min_lr_ratio={cfg.min_lr_ratio}: use a value in [0, 1]"
        )
    if cfg.warmup_steps < 0 or cfg.decay_steps < 0:
        raise ValueError("trainer.optimizer.warmup_steps and decay_steps must be >= 0")


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the base lr for the update with 0-based index ``step``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    end = cfg.decay_steps or max_steps
    span = max(end - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def lr_lambda(cfg: OptimizerConfig, max_steps: int) -> Callable[[int], float]:
    validate_schedule(cfg)
    return lambda step: lr_factor(step, cfg, max_steps)
