"""Configuration of `python -m omni_train.train_vae` (defaults live here once).

The model, data, trainer and logger groups are the denoiser's own (``model.vae`` is the VAE
being trained); ``vae_training`` holds the loss weights and the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from omni_train.data.config import DataConfig
from omni_train.models.config import ModelConfig
from omni_train.trainer.config import LoggerConfig, TrainerConfig


@dataclass
class VAELossConfig:
    # Reconstruction: mean absolute error on pixels in [-1, 1] ...
    l1: float = 1.0
    # ... plus (1 - SSIM) on frames mapped to [0, 1] (omni_train/evaluation/image.py).
    ssim: float = 0.2
    # KL of the diagonal Gaussian posterior to N(0, I), averaged per latent element.
    kl: float = 1e-6


@dataclass
class VAERecipeConfig:
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    # The first image_steps updates train on single frames (the causal VAE encodes frame 0
    # alone, so images are 1-frame clips): image_frames frames drawn from each clip.
    image_steps: int = 0
    image_frames: int = 4
    # Decode a sample of the posterior (true) or its mean (false, a plain autoencoder).
    sample_posterior: bool = True
    # Held-out reconstruction PSNR / SSIM on the first val_clips clips of data.val_shards,
    # every val_every steps and at the end (0 = only at the end).
    val_every: int = 0
    val_clips: int = 4
    # Training clips whose posterior means give the latent shift / scale written with the
    # weights (model.vae.shift_factor / scaling_factor for the denoiser).
    latent_stat_clips: int = 4
    # No training: score model.vae.pretrained on the first val_clips clips of data.val_shards,
    # print the held-out PSNR / SSIM as JSON and exit (run_dir and data.shards unused).
    evaluate_only: bool = False


@dataclass
class TrainVAEConfig:
    experiment: str = "vae"
    # Checkpoints, metrics.jsonl, W&B and the end product run_dir/vae.safetensors.
    run_dir: str = ""
    seed: int = 0
    # Validate the config and the shards, print the resolved config, and exit.
    check_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    vae_training: VAERecipeConfig = field(default_factory=VAERecipeConfig)


def register_vae_configs() -> None:
    ConfigStore.instance().store(name="train_vae_schema", node=TrainVAEConfig)
