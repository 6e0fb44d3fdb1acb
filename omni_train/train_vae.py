"""VAE training entry point: fits this project's causal 3D VAE and writes vae.safetensors.

    torchrun --nproc_per_node N -m omni_train.train_vae run_dir=DIR \
        data.shards='DIR/shards/*.tar' data.val_shards='HELDOUT/shards/*.tar' [overrides]

The end product, run_dir/vae.safetensors, is what model.vae.pretrained= loads. Scoring a
trained VAE on other clips (no training):

    python -m omni_train.train_vae vae_training.evaluate_only=true \
        model.vae.pretrained=RUN/vae.safetensors data.val_shards='DIR/shards/*.tar' [sizes]
"""

from __future__ import annotations

import dataclasses
import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from omni_train.trainer.run_setup import run_validated
from omni_train.vae_training.config import TrainVAEConfig, register_vae_configs
from omni_train.vae_training.validate import validate_vae_train_config

log = logging.getLogger("omni_train.train_vae")
register_vae_configs()


def evaluate(cfg: TrainVAEConfig) -> dict[str, float]:
    """Held-out PSNR / SSIM of model.vae.pretrained on the first clips of data.val_shards."""
    import torch

    from omni_train.models.encoders import build_vae
    from omni_train.vae_training.metrics import fixed_clips, reconstruction_scores

    vae = build_vae(cfg.model.vae).eval()
    data = dataclasses.replace(cfg.data, shards=cfg.data.val_shards)
    clips = fixed_clips(data, cfg.data.val_shards, cfg.vae_training.val_clips, cfg.seed)
    with torch.no_grad():
        scores = reconstruction_scores(lambda video: vae(video, sample=False)[0], clips)
    return {**scores, "val/clips": len(clips)}


def _train_or_evaluate(cfg: TrainVAEConfig, resolved: dict) -> None:
    if cfg.vae_training.evaluate_only:
        print(json.dumps(evaluate(cfg), sort_keys=True))
        return
    from omni_train.vae_training.trainer import VAETrainer

    VAETrainer(cfg, resolved=resolved).run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_vae")
def main(raw: DictConfig) -> None:
    cfg: TrainVAEConfig = OmegaConf.to_object(raw)
    run_validated(raw, cfg, validate_vae_train_config, _train_or_evaluate, log)


if __name__ == "__main__":
    main()
