"""Checks of a VAE training config that need more than types; they run before any rank."""

from __future__ import annotations

from omni_train.contracts import SPATIAL_STRIDE
from omni_train.data.stream import shard_list
from omni_train.models.vae import check_vae_config
from omni_train.trainer.ds_config import deepspeed_config
from omni_train.trainer.lr_schedule import validate_schedule
from omni_train.vae_training.config import TrainVAEConfig
from omni_train.validate import ConfigError


def validate_vae_train_config(cfg: TrainVAEConfig, world_size: int) -> None:
    if cfg.vae_training.evaluate_only:
        _validate_evaluation(cfg)
        return
    if not cfg.run_dir:
        raise ConfigError("run_dir is empty: pass run_dir=DIR (checkpoints and vae.safetensors)")
    try:
        check_vae_config(cfg.model.vae)
        deepspeed_config(cfg.trainer, cfg.data.batch_size, world_size)
        validate_schedule(cfg.trainer.optimizer)
        cfg.data.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.data.precomputed:
        raise ConfigError("data.precomputed=true holds latents, not pixels: the VAE trains on mp4")
    for axis, size in zip(("height", "width"), cfg.data.resolution, strict=True):
        if size % SPATIAL_STRIDE:
            raise ConfigError(
                f"data.resolution {axis}={size} must be a multiple of {SPATIAL_STRIDE}"
            )
    if cfg.trainer.save_every <= 0 or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps and trainer.save_every must be positive")
    recipe = cfg.vae_training
    for name in ("l1", "ssim", "kl"):
        if getattr(recipe.loss, name) < 0:
            raise ConfigError(f"vae_training.loss.{name} must be 0 or more")
    if recipe.image_steps < 0 or recipe.image_frames < 1:
        raise ConfigError("vae_training.image_steps must be >= 0 and image_frames >= 1")
    if recipe.val_every < 0 or recipe.val_clips < 1 or recipe.latent_stat_clips < 1:
        raise ConfigError(
            "vae_training.val_every must be >= 0, val_clips and latent_stat_clips >= 1"
        )
    if recipe.val_every > 0 and not cfg.data.val_shards:
        raise ConfigError(
            f"vae_training.val_every={recipe.val_every} needs held-out clips: set "
            "data.val_shards='HELDOUT/shards/*.tar' (or vae_training.val_every=0)"
        )
    for key, shards in (("data.shards", cfg.data.shards), ("data.val_shards", cfg.data.val_shards)):
        if not shards:
            continue
        try:
            shard_list(shards)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{key}: {err}") from err


def _validate_evaluation(cfg: TrainVAEConfig) -> None:
    if not cfg.model.vae.pretrained:
        raise ConfigError(
            "vae_training.evaluate_only=true scores a trained VAE: set "
            "model.vae.pretrained=RUN/vae.safetensors"
        )
    if not cfg.data.val_shards:
        raise ConfigError(
            "vae_training.evaluate_only=true needs clips: set data.val_shards='DIR/shards/*.tar'"
        )
    try:
        shard_list(cfg.data.val_shards)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.val_shards: {err}") from err
