"""The Hydra tree composes, and bad overrides fail early naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from omni_train.config import TrainConfig
from omni_train.testing import compose_train_config
from omni_train.validate import ConfigError, validate_train_config


def test_smoke_experiment_composes_into_the_structured_config():
    cfg, resolved = compose_train_config(["experiment=smoke", "run_dir=/tmp/x"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.experiment == "smoke"
    assert cfg.model.name == "tiny"
    assert [s.start_step for s in cfg.curriculum.stages] == [0, 20, 40]
    assert cfg.trainer.zero_stage == 2
    assert resolved["trainer"]["max_steps"] == cfg.trainer.max_steps


@pytest.mark.parametrize(
    "override",
    ["seed=3", "trainer.max_steps=7", "trainer.save_every=2", "trainer.zero_stage=3"],
)
def test_contract_overrides_exist(override):
    cfg, _ = compose_train_config(["experiment=smoke", "run_dir=/tmp/x", override])
    key, value = override.split("=")
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == int(value)


def test_small_model_preset_composes():
    cfg, _ = compose_train_config(["model=small", "run_dir=/tmp/x"])
    assert cfg.model.name == "small"
    assert cfg.model.dit.hidden_size > 64


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.zero_stag=3", "zero_stag"),
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("data.resolution=12", "data.resolution"),
    ],
)
def test_wrong_key_or_type_fails_naming_the_key(override, named):
    with pytest.raises(Exception) as err:
        compose_train_config(["experiment=smoke", "run_dir=/tmp/x", override])
    assert named in str(err.value) + str(err.value.__cause__)


def _valid(overrides, shards):
    cfg, _ = compose_train_config(
        ["experiment=smoke", "run_dir=/tmp/x", f"data.shards={shards}", *overrides]
    )
    validate_train_config(cfg, world_size=2)


def test_validation_names_the_value_and_the_fix(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    _valid([], shard)
    with pytest.raises(ConfigError, match="data.num_frames"):
        _valid(["data.num_frames=16"], shard)
    with pytest.raises(ConfigError, match="resolution"):
        _valid(["data.resolution=[60,64]"], shard)
    with pytest.raises(ConfigError, match="zero_stage"):
        _valid(["trainer.zero_stage=4"], shard)
    with pytest.raises(ConfigError, match="data.shards"):
        _valid([], tmp_path / "missing" / "*.tar")


def test_bad_override_exits_before_any_rank_starts(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni_train.train",
            "experiment=smoke",
            f"run_dir={tmp_path}",
            "data.shards=nothing/*.tar",
            "trainer.zero_stage=9",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "zero_stage" in proc.stdout + proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.optimizer.schedule=step", "trainer.optimizer.schedule"),
        ("trainer.preemption.exit_code=0", "trainer.preemption.exit_code"),
        ("trainer.offload_param=cpu", "trainer.offload_param"),
        ("trainer.nonfinite.max_consecutive=0", "trainer.nonfinite.max_consecutive"),
    ],
)
def test_trainer_settings_are_checked_before_launch(tmp_path, override, named):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    with pytest.raises(ConfigError, match=named):
        _valid([override], shard)


def test_trainer_presets_compose(tmp_path):
    cfg, _ = compose_train_config(
        ["experiment=smoke", "run_dir=/tmp/x", "trainer=zero3_offload", "trainer.ema.enabled=true"]
    )
    assert cfg.trainer.zero_stage == 3
    assert cfg.trainer.offload_optimizer == "cpu" and cfg.trainer.offload_param == "cpu"
    assert cfg.trainer.ema.enabled
