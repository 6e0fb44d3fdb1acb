"""Checks across configs (each config checks its own fields in its validate()); they run
before any process group or worker starts."""

from __future__ import annotations

from omni_train.config import TrainConfig
from omni_train.contracts import SPATIAL_STRIDE
from omni_train.curriculum import validate_curriculum
from omni_train.data.stream import shard_list
from omni_train.trainer.config import VAL_TASKS
from omni_train.trainer.ds_config import deepspeed_config
from omni_train.trainer.lr_schedule import validate_schedule


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the fix in the message."""


def validate_train_config(cfg: TrainConfig, world_size: int) -> None:
    try:
        validate_curriculum(cfg.curriculum)
        deepspeed_config(cfg.trainer, cfg.data.batch_size, world_size)
        validate_schedule(cfg.trainer.optimizer)
        cfg.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    patch = cfg.model.dit.patch_size
    for axis, size in zip(("height", "width"), cfg.data.resolution, strict=True):
        if size % (SPATIAL_STRIDE * patch):
            raise ConfigError(
                f"data.resolution {axis}={size} must be a multiple of {SPATIAL_STRIDE * patch} "
                f"(VAE stride {SPATIAL_STRIDE} x model.dit.patch_size {patch})"
            )
    if cfg.trainer.save_every <= 0 or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps and trainer.save_every must be positive")
    _validate_trainer_extras(cfg)
    for source in cfg.data.source_list():
        if not source.shards:
            raise ConfigError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
        try:
            shard_list(source.shards)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err


def _validate_trainer_extras(cfg: TrainConfig) -> None:
    tcfg = cfg.trainer
    if tcfg.ema.enabled and not 0.0 < tcfg.ema.decay < 1.0:
        raise ConfigError(f"trainer.ema.decay={tcfg.ema.decay}: use a value in (0, 1)")
    if not 1 <= tcfg.preemption.exit_code <= 255:
        raise ConfigError(
            f"trainer.preemption.exit_code={tcfg.preemption.exit_code}: use 1-255 (143 default)"
        )
    if tcfg.nonfinite.max_consecutive < 1:
        raise ConfigError("trainer.nonfinite.max_consecutive must be >= 1")
    _validate_val_loss(cfg)
    validation = tcfg.validation
    if validation.every < 0 or (validation.ref_images and not validation.audio):
        raise ConfigError(
            "trainer.validation: every must be >= 0, and ref_images needs one audio file each "
            "(trainer.validation.audio=[a.wav,...])"
        )


def _validate_val_loss(cfg: TrainConfig) -> None:
    tcfg, data = cfg.trainer, cfg.data
    vcfg = tcfg.val_loss
    if tcfg.val_every < 0:
        raise ConfigError(f"trainer.val_every={tcfg.val_every}: use 0 (off) or a step count")
    if data.val_shards.strip():
        try:
            shard_list(data.val_shards)
        except ValueError as err:
            raise ConfigError(str(err).replace("data.shards=", "data.val_shards=", 1)) from err
    if tcfg.val_every == 0 and not tcfg.val_at_start:
        return
    if not data.val_shards.strip() and data.val_holdout <= 0:
        raise ConfigError(
            "trainer.val_every / trainer.val_at_start need held-out clips: set "
            "data.val_shards='DIR/shards/*.tar' or data.val_holdout=0.02 (a share of the "
            "training samples, then never trained on)"
        )
    if vcfg.num_clips < 1:
        raise ConfigError(f"trainer.val_loss.num_clips={vcfg.num_clips} must be at least 1")
    if not 1 <= vcfg.timesteps <= 256:
        raise ConfigError(f"trainer.val_loss.timesteps={vcfg.timesteps}: use 1-256 (8 default)")
    unknown = [task for task in vcfg.tasks if task not in VAL_TASKS]
    if unknown or not vcfg.tasks:
        raise ConfigError(
            f"trainer.val_loss.tasks={list(vcfg.tasks)}: use a non-empty subset of {VAL_TASKS}"
        )
    if vcfg.use_ema and not tcfg.ema.enabled:
        raise ConfigError(
            "trainer.val_loss.use_ema=true needs trainer.ema.enabled=true (or use_ema=false)"
        )
