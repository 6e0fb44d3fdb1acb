"""VAE training throughput on one CPU rank (the vae_demo experiment's model, fp32, ZeRO-2).

Figures: clip frames per second of `omni_train.train_vae`'s steps (data loading, DeepSpeed,
the rank agreement included) and of a floor doing the same work on one in-memory batch with
plain torch (forward, L1 + SSIM + KL, backward, clip, AdamW); the ratio is the trainer's
overhead. Also the checkpoint save time (weights, optimizer, latent statistics).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from data_pipelines.testing import build_sample_shards  # noqa: E402
from omni_train.testing import CONF_DIR, run_ranks  # noqa: E402

STEPS = 12
WARMUP = 2


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from omni_train.vae_training.config import register_vae_configs

    register_vae_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        raw = compose(config_name="train_vae", overrides=overrides)
    return OmegaConf.to_object(raw), OmegaConf.to_container(raw, resolve=True)


def _measure(overrides: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    from omni_train.models.vae import CausalVAE
    from omni_train.vae_training.losses import vae_losses
    from omni_train.vae_training.trainer import VAETrainer

    cfg, resolved = _compose(overrides)
    trainer = VAETrainer(cfg, resolved)
    times, frames = [], []
    original = trainer._train_step

    def timed(batches, flag):
        started = time.perf_counter()
        out = original(batches, flag)
        times.append(time.perf_counter() - started)
        frames.append(out[2])
        return out

    trainer._train_step = timed
    trainer.run()
    started = time.perf_counter()
    trainer.save()
    save_s = time.perf_counter() - started
    video = trainer.stat_clips[0].repeat(cfg.data.batch_size, 1, 1, 1, 1)
    dist.destroy_process_group()

    torch.manual_seed(0)
    vae = CausalVAE(cfg.model.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.trainer.optimizer.lr)
    generator = torch.Generator().manual_seed(0)
    floor = []
    for _ in range(STEPS):
        started = time.perf_counter()
        recon, mean, logvar = vae(video, generator, cfg.vae_training.sample_posterior)
        loss = vae_losses(recon, video, mean, logvar, cfg.vae_training.loss).total
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.trainer.grad_clip)
        opt.step()
        floor.append(time.perf_counter() - started)
    clip_frames = video.shape[0] * video.shape[2]
    return {
        "step_s": statistics.median(times[WARMUP:]),
        "floor_s": statistics.median(floor[WARMUP:]),
        "frames": clip_frames,
        "trainer_frames": statistics.median(frames),
        "save_s": save_s,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = build_sample_shards(Path(tmp) / "corpus", num_clips=3, seed=0)
        overrides = [
            "experiment=vae_demo",
            f"run_dir={tmp}/run",
            f"data.shards={data}/shards/*.tar",
            f"trainer.max_steps={STEPS}",
            f"trainer.save_every={STEPS * 10}",
            "vae_training.image_steps=0",
            "vae_training.val_every=0",
            "trainer.progress_bar=false",
            "logger.wandb.enabled=false",
        ]
        result = run_ranks(_measure, 1, overrides)[0]
    step_fps = result["trainer_frames"] / result["step_s"]
    floor_fps = result["frames"] / result["floor_s"]
    print(
        f"VAE train step (train_vae)   {step_fps:8.1f} clip frames/s  {result['step_s'] * 1e3:7.1f} ms"
    )
    print(
        f"VAE train step (plain torch) {floor_fps:8.1f} clip frames/s  {result['floor_s'] * 1e3:7.1f} ms (floor)"
    )
    print(f"train_vae / floor            x{step_fps / floor_fps:.2f} of the floor's throughput")
    print(
        f"checkpoint save              {result['save_s'] * 1e3:8.1f} ms  x{result['save_s'] / result['step_s']:.1f} steps"
    )


if __name__ == "__main__":
    main()
