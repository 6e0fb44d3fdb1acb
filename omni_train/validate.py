"""Checks that need more than types: they run before any process group or worker starts."""

from __future__ import annotations

from omni_train.config import TrainConfig
from omni_train.curriculum import validate_curriculum
from omni_train.data.stream import shard_list
from omni_train.trainer.ds_config import deepspeed_config


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the fix in the message."""


def validate_train_config(cfg: TrainConfig, world_size: int) -> None:
    try:
        validate_curriculum(cfg.curriculum)
        deepspeed_config(cfg.trainer, cfg.data.batch_size, world_size)
        cfg.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    frames = cfg.data.num_frames
    if frames < 1 or (frames - 1) % 4:
        raise ConfigError(
            f"data.num_frames={frames}: the causal VAE needs 1 + 4k frames (e.g. 17 or 33)"
        )
    patch = cfg.model.dit.patch_size
    for axis, size in zip(("height", "width"), cfg.data.resolution, strict=True):
        if size % (8 * patch):
            raise ConfigError(
                f"data.resolution {axis}={size} must be a multiple of {8 * patch} "
                f"(VAE stride 8 x model.dit.patch_size {patch})"
            )
    if cfg.trainer.save_every <= 0 or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps and trainer.save_every must be positive")
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
    try:
        shard_list(cfg.data.shards)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
