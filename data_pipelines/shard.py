"""Shard a folder of videos into WebDataset tars with quality tags, manifest, rejects, stats.

    python -m data_pipelines.shard input_dir=DIR output_dir=DIR [fps=8 clip_seconds=3 ...]

Re-running on the same output_dir resumes: finished shards are kept as they are.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from data_pipelines.annotators import AnnotatorUnavailable
from data_pipelines.config import ShardConfig, register_configs
from data_pipelines.pipeline import run_shard
from data_pipelines.stats import format_summary

log = logging.getLogger(__name__)

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="shard")
def main(raw: DictConfig) -> None:
    for key in ("input_dir", "output_dir"):
        if OmegaConf.is_missing(raw, key):
            log.error(
                "%s is required: python -m data_pipelines.shard input_dir=DIR output_dir=DIR", key
            )
            sys.exit(2)
    cfg: ShardConfig = OmegaConf.to_object(raw)
    started = time.perf_counter()
    try:
        stats = run_shard(cfg)
    except (ValueError, AnnotatorUnavailable) as err:
        log.error("%s", err)
        sys.exit(2)
    out = Path(cfg.output_dir).resolve()
    if cfg.num_partitions > 1:
        log.info("%s", format_summary(stats))
        log.info(
            "partition %d of %d done; when all are: python -m data_pipelines.merge output_dir=%s",
            cfg.partition, cfg.num_partitions, out,
        )  # fmt: skip
        return
    log.info("%s", format_summary(stats))
    log.info(
        "shards:   %s/shards/*.tar\nmanifest: %s/manifest.jsonl\nrejects:  %s/rejects.jsonl"
        "\nstats:    %s/stats.json",
        out,
        out,
        out,
        out,
    )
    log.info("done in %.1f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
