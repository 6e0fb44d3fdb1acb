"""Training entry point.

    torchrun --nproc_per_node N -m omni_train.train experiment=smoke run_dir=DIR \
        data.shards='DIR/shards/*.tar' [overrides]
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from omni_train.config import TrainConfig, register_configs
from omni_train.validate import ConfigError, validate_train_config

log = logging.getLogger("omni_train.train")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(raw: DictConfig) -> None:
    cfg: TrainConfig = OmegaConf.to_object(raw)
    try:
        world_size = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
        validate_train_config(cfg, world_size=int(world_size))
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
    if cfg.check_only:
        print(OmegaConf.to_yaml(raw, resolve=True))
        return
    from omni_train.trainer.trainer import Trainer

    trainer = Trainer(cfg, resolved=OmegaConf.to_container(raw, resolve=True))
    trainer.run()


if __name__ == "__main__":
    main()
