"""Training entry point.

    torchrun --nproc_per_node N -m omni_train.train experiment=smoke run_dir=DIR \
        data.shards='DIR/shards/*.tar' [overrides]
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from omni_train.config import TrainConfig, register_configs
from omni_train.trainer.run_setup import run_validated
from omni_train.validate import validate_train_config

log = logging.getLogger("omni_train.train")
register_configs()


def _train(cfg: TrainConfig, resolved: dict) -> None:
    from omni_train.trainer.trainer import Trainer

    Trainer(cfg, resolved=resolved).run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(raw: DictConfig) -> None:
    cfg: TrainConfig = OmegaConf.to_object(raw)
    run_validated(raw, cfg, validate_train_config, _train, log)


if __name__ == "__main__":
    main()
