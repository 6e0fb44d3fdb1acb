"""Checks across configs (each config checks its own fields in its validate()); they run
before any process group or worker starts."""

from __future__ import annotations

from omni_train.config import TrainConfig
from omni_train.contracts import SPATIAL_STRIDE, latent_frames, pixel_frames
from omni_train.curriculum import validate_curriculum
from omni_train.data.stream import shard_list
from omni_train.models.denoiser import attention_heads
from omni_train.models.sequence_parallel import check_heads
from omni_train.trainer.ds_config import deepspeed_config
from omni_train.trainer.lr_schedule import validate_schedule


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the fix in the message."""


def validate_train_config(cfg: TrainConfig, world_size: int) -> None:
    try:
        validate_curriculum(cfg.curriculum)
        deepspeed_config(cfg.trainer, cfg.data.batch_size, world_size)
        validate_schedule(cfg.trainer.optimizer)
        cfg.trainer.validate()
        cfg.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _validate_sequence_parallel(cfg, world_size)
    patch = cfg.model.dit.patch_size
    for axis, size in zip(("height", "width"), cfg.data.resolution, strict=True):
        if size % (SPATIAL_STRIDE * patch):
            raise ConfigError(
                f"data.resolution {axis}={size} must be a multiple of {SPATIAL_STRIDE * patch} "
                f"(VAE stride {SPATIAL_STRIDE} x model.dit.patch_size {patch})"
            )
    _validate_val_data(cfg)
    for source in cfg.data.source_list():
        if not source.shards:
            raise ConfigError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
        try:
            shard_list(source.shards)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from err


def _validate_sequence_parallel(cfg: TrainConfig, world_size: int) -> None:
    """The world splits into groups of trainer.sequence_parallel ranks, which split the heads
    and each clip's latent frames."""
    sequence_parallel = cfg.trainer.sequence_parallel
    if world_size % sequence_parallel:
        raise ConfigError(
            f"trainer.sequence_parallel={sequence_parallel} must divide the world size "
            f"{world_size} (world size = data-parallel size x trainer.sequence_parallel)"
        )
    if sequence_parallel == 1:
        return
    heads, setting = attention_heads(cfg.model)
    try:
        check_heads(heads, sequence_parallel, setting)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # Clips come in data.num_frames, or in the buckets' lengths when there are buckets.
    lengths = [
        (f"data.buckets.{i}.num_frames", bucket.num_frames)
        for i, bucket in enumerate(cfg.data.buckets)
    ] or [("data.num_frames", cfg.data.num_frames)]
    for key, frames in lengths:
        if latent_frames(frames) < sequence_parallel:
            raise ConfigError(
                f"trainer.sequence_parallel={sequence_parallel} is more than the "
                f"{latent_frames(frames)} latent frames of {key}={frames}: every "
                f"sequence-parallel rank needs a whole frame (use at least "
                f"{pixel_frames(sequence_parallel)} frames, or a smaller sequence_parallel)"
            )


def _validate_val_data(cfg: TrainConfig) -> None:
    """The validation loss needs held-out clips from the data config."""
    trainer_cfg, data = cfg.trainer, cfg.data
    if data.val_shards.strip():
        try:
            shard_list(data.val_shards)
        except ValueError as err:
            raise ConfigError(str(err).replace("data.shards=", "data.val_shards=", 1)) from err
    if trainer_cfg.val_every == 0 and not trainer_cfg.val_at_start:
        return
    if not data.val_shards.strip() and data.val_holdout <= 0:
        raise ConfigError(
            "trainer.val_every / trainer.val_at_start need held-out clips: set "
            "data.val_shards='DIR/shards/*.tar' or data.val_holdout=0.02 (a share of the "
            "training samples, then never trained on)"
        )
