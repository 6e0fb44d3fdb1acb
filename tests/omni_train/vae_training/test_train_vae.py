"""VAE training end to end on 2 forked ranks: stop and resume gives the same losses, the
written vae.safetensors loads through model.vae.pretrained= and encodes like the trained
module, and the logged held-out PSNR / SSIM equal a direct computation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.testing import build_sample_shards
from omni_train.data.config import DataConfig
from omni_train.evaluation.image import ssim_per_image
from omni_train.models.config import ModelConfig
from omni_train.models.encoders import build_frozen_encoders
from omni_train.models.vae import CausalVAE
from omni_train.models.weights import WeightsMismatch, load_strict, read_metadata
from omni_train.testing import CHECKPOINT_LOADER_KEYS, CHECKPOINT_RNG_KEYS, metric_rows, run_ranks
from omni_train.vae_training.metrics import fixed_clips

pytestmark = pytest.mark.slow

TINY_VAE = ("model.vae.base_channels=4", "model.vae.latent_channels=8")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    train = build_sample_shards(tmp_path_factory.mktemp("train"), num_clips=2, seed=0)
    held_out = build_sample_shards(tmp_path_factory.mktemp("held_out"), num_clips=2, seed=1)
    return str(train / "shards" / "*.tar"), str(held_out / "shards" / "*.tar")


def _overrides(run_dir: Path, data: tuple[str, str], max_steps: int, wandb: bool) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.shards={data[0]}",
        f"data.val_shards={data[1]}",
        "data.resolution=[32,32]",
        "data.num_frames=5",
        "data.batch_size=1",
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=2",
        "trainer.optimizer.lr=1e-3",
        "trainer.progress_bar=false",
        f"logger.wandb.enabled={str(wandb).lower()}",
        "vae_training.image_steps=1",
        "vae_training.image_frames=2",
        "vae_training.val_every=2",
        "vae_training.val_clips=2",
        "vae_training.latent_stat_clips=2",
        *TINY_VAE,
    ]


def train_vae_in_rank(overrides: list[str]) -> dict:
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from omni_train.testing import CONF_DIR
    from omni_train.vae_training.config import register_vae_configs
    from omni_train.vae_training.trainer import VAETrainer

    register_vae_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        raw = compose(config_name="train_vae", overrides=overrides)
    trainer = VAETrainer(OmegaConf.to_object(raw), OmegaConf.to_container(raw, resolve=True))
    trainer.run()
    probe = trainer.val_clips[0]
    with torch.no_grad():
        encoded = trainer.engine.module.encode(probe)
    dist.destroy_process_group()
    # numpy, not tensors: torch would share tensors through files that die with the rank.
    return {"step": trainer.global_step, "probe": probe.numpy(), "posterior_mean": encoded.numpy()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("vae_full")
    results = run_ranks(train_vae_in_rank, 2, _overrides(run_dir, data, 4, wandb=False))
    assert [r["step"] for r in results] == [4, 4]
    return run_dir, results


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metric_rows(run_dir) if "loss" in r]


def test_stop_and_resume_gives_the_same_losses(uninterrupted, data, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    run_ranks(train_vae_in_rank, 2, _overrides(run_dir, data, 2, wandb=True))
    first_id = json.loads((run_dir / "wandb_run_id.json").read_text())
    run_ranks(train_vae_in_rank, 2, _overrides(run_dir, data, 4, wandb=True))
    resumed, full = _train_rows(run_dir), _train_rows(full_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["image_phase"] for r in full] == [1, 0, 0, 0]
    assert full[0]["batch_size"] == 4  # 2 ranks x 1 clip x 2 frames drawn as images
    assert full[1]["batch_size"] == 2
    for name in ("loss", "loss_l1", "loss_ssim", "loss_kl"):
        assert [r[name] for r in resumed] == pytest.approx([r[name] for r in full], rel=1e-5)
    assert json.loads((run_dir / "wandb_run_id.json").read_text()) == first_id
    assert (run_dir / "wandb").is_dir()
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert meta["wandb_run_id"] == first_id["id"]


def test_checkpoints_and_the_run_hold_a_loadable_vae_file(uninterrupted):
    run_dir, _ = uninterrupted
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000004"]
    final = run_dir / "checkpoints" / "step_00000004" / "vae.safetensors"
    assert (run_dir / "vae.safetensors").read_bytes() == final.read_bytes()
    header = read_metadata(final)
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert float(header["omni_train.vae.shift_factor"]) == pytest.approx(meta["latent_shift"])
    assert float(header["omni_train.vae.scaling_factor"]) == pytest.approx(meta["latent_scale"])


# File -> its top-level JSON keys (None: not JSON), recorded from a checkpoint written before
# the trainer saved through CheckpointManager: earlier checkpoints must keep resuming.
EXPECTED_LAYOUT = {
    "complete.json": [
        "data_seed",
        "latent_scale",
        "latent_shift",
        "reason",
        "step",
        "time",
        "val_frames",
        "val_psnr",
        "val_ssim",
        "world_size",
        "zero_stage",
    ],
    "config.yaml": None,
    "loader_rank00000.json": CHECKPOINT_LOADER_KEYS,
    "loader_rank00001.json": CHECKPOINT_LOADER_KEYS,
    "mp_rank_00_model_states.pt": None,
    "rng_rank00000.json": CHECKPOINT_RNG_KEYS,
    "rng_rank00001.json": CHECKPOINT_RNG_KEYS,
    "vae.safetensors": None,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": None,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": None,
}


def test_checkpoints_hold_the_files_and_keys_earlier_versions_wrote(uninterrupted):
    run_dir, _ = uninterrupted
    for name in ("step_00000002", "step_00000004"):
        checkpoint = run_dir / "checkpoints" / name
        layout = {}
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
            keys = sorted(json.loads(path.read_text())) if path.suffix == ".json" else None
            if path.name.startswith("loader_rank") and set(CHECKPOINT_LOADER_KEYS) <= set(
                keys or []
            ):
                keys = CHECKPOINT_LOADER_KEYS
            layout[str(path.relative_to(checkpoint))] = keys
        assert layout == EXPECTED_LAYOUT, name
    assert sorted(read_metadata(run_dir / "vae.safetensors")) == [
        "omni_train.vae.arch",
        "omni_train.vae.scaling_factor",
        "omni_train.vae.shift_factor",
    ]


def _model_cfg(pretrained: Path, **vae_fields) -> ModelConfig:
    cfg = ModelConfig()
    cfg.vae = dataclasses.replace(
        cfg.vae, base_channels=4, latent_channels=8, pretrained=str(pretrained), **vae_fields
    )
    return cfg


def test_the_file_loads_through_pretrained_and_encodes_like_the_trained_module(uninterrupted):
    run_dir, results = uninterrupted
    path = run_dir / "vae.safetensors"
    encoders = build_frozen_encoders(_model_cfg(path))
    shift = float(read_metadata(path)["omni_train.vae.shift_factor"])
    scale = float(read_metadata(path)["omni_train.vae.scaling_factor"])
    assert encoders.vae.cfg.shift_factor == shift and encoders.vae.cfg.scaling_factor == scale
    probe = torch.from_numpy(results[0]["probe"])
    # The trained module encodes with factors 1 / 0; the loaded one normalises its latents.
    expected = (torch.from_numpy(results[0]["posterior_mean"]) - shift) * scale
    assert torch.equal(encoders.encode_video(probe), expected)
    # Chunked causal encoding stays exact for the trained weights: 13 frames in chunks of 5.
    longer = torch.cat([probe, probe[:, :, 1:].flip(2), probe[:, :, 1:]], dim=2)
    chunked = build_frozen_encoders(_model_cfg(path, chunk_frames=5))
    assert chunked.vae.cfg.chunk_frames == 5
    assert torch.allclose(
        chunked.encode_video(longer), encoders.encode_video(longer), rtol=0, atol=1e-5
    )


def test_logged_heldout_psnr_and_ssim_equal_a_direct_computation(uninterrupted, data):
    run_dir, _ = uninterrupted
    vae_cfg = _model_cfg(run_dir / "vae.safetensors").vae
    vae = CausalVAE(dataclasses.replace(vae_cfg, pretrained="")).eval()
    load_strict(vae, run_dir / "vae.safetensors", "VAE")
    window = DataConfig(shards=data[1], resolution=[32, 32], num_frames=5)
    clips = fixed_clips(window, data[1], 2, seed=0)
    assert len(clips) == 2
    psnrs, ssims = [], []

    with torch.no_grad():
        for clip in clips:
            mean, _ = vae.posterior(clip)
            recon = vae.decoder(mean)
            real = ((clip[0].permute(1, 0, 2, 3).numpy() + 1) / 2).astype(np.float64)
            fake = np.clip((recon[0].permute(1, 0, 2, 3).numpy() + 1) / 2, 0, 1).astype(np.float64)
            for a, b in zip(fake, real, strict=True):
                psnrs.append(10 * math.log10(1.0 / np.mean((a - b) ** 2)))
                ssims.append(
                    float(ssim_per_image(torch.from_numpy(a)[None], torch.from_numpy(b)[None]))
                )
    rows = [r for r in metric_rows(run_dir) if "val/psnr" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["val/frames"] == len(psnrs) == 10
    assert rows[-1]["val/psnr"] == pytest.approx(float(np.mean(psnrs)), rel=1e-4)
    assert rows[-1]["val/ssim"] == pytest.approx(float(np.mean(ssims)), rel=1e-4)


def test_a_file_of_another_architecture_fails_naming_the_keys(uninterrupted):
    run_dir, _ = uninterrupted
    cfg = ModelConfig()
    cfg.vae = dataclasses.replace(cfg.vae, pretrained=str(run_dir / "vae.safetensors"))
    with pytest.raises(WeightsMismatch) as caught:
        build_frozen_encoders(cfg)
    assert "set: model.vae.latent_channels=8 model.vae.base_channels=4" in str(caught.value)
