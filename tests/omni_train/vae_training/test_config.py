"""The train_vae config composes from conf/train_vae.yaml, and bad values fail naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from omni_train.models.config import ModelConfig
from omni_train.models.encoders import build_frozen_encoders
from omni_train.testing import CONF_DIR
from omni_train.vae_training.config import TrainVAEConfig, register_vae_configs
from omni_train.vae_training.validate import validate_vae_train_config
from omni_train.validate import ConfigError


def compose_vae(overrides: list[str]) -> TrainVAEConfig:
    register_vae_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        raw = compose(config_name="train_vae", overrides=overrides)
    return OmegaConf.to_object(raw)


@pytest.fixture
def shards(tmp_path) -> str:
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    return str(tmp_path / "*.tar")


def test_demo_experiment_composes_and_validates(shards):
    cfg = compose_vae(["experiment=vae_demo", "run_dir=r", f"data.shards={shards}"])
    assert cfg.experiment == "vae_demo"
    assert cfg.data.resolution == [64, 64]
    validate_vae_train_config(cfg, world_size=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["vae_training.val_every=5"], r"vae_training.val_every=5 needs held-out clips"),
        (["run_dir="], r"run_dir is empty"),
        (["data.resolution=[60,64]"], r"data.resolution height=60 must be a multiple of 8"),
        (["model.vae.chunk_frames=6"], r"vae.chunk_frames must be 0 or 1 \+ 4k"),
        (["vae_training.loss.kl=-1"], r"vae_training.loss.kl must be 0 or more"),
        (["data.val_shards=/nonexistent/*.tar"], r"data.val_shards"),
        (["vae_training.evaluate_only=true"], r"set model.vae.pretrained="),
    ],
)
def test_bad_values_fail_naming_the_key(shards, overrides, message):
    cfg = compose_vae(["run_dir=r", f"data.shards={shards}", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_vae_train_config(cfg, world_size=1)


def test_a_missing_or_unreadable_vae_file_names_the_key(tmp_path):
    cfg = ModelConfig()
    cfg.vae.pretrained = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.vae\.pretrained=.*nope\.safetensors"):
        build_frozen_encoders(cfg)
    garbage = tmp_path / "vae.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cfg.vae.pretrained = str(garbage)
    with pytest.raises(ValueError, match=r"model\.vae\.pretrained=.* not a readable safetensors"):
        build_frozen_encoders(cfg)
