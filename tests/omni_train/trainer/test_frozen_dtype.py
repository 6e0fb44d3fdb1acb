"""The frozen encoders are stored in trainer.frozen_dtype and the run still trains."""

from __future__ import annotations

import math

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.testing import metric_rows, run_ranks

pytestmark = pytest.mark.slow


def _train_and_report_dtypes(overrides: list[str]) -> tuple[set[str], int]:
    import torch.distributed as dist

    from omni_train.testing import compose_train_config
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    dtypes = {str(p.dtype) for p in trainer.encoders.parameters()}
    trainer.run()
    dist.destroy_process_group()
    return dtypes, trainer.global_step


def test_bf16_frozen_encoders_feed_a_fp32_denoiser(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=1, seed=0)
    overrides = [
        "experiment=smoke",
        f"run_dir={tmp_path / 'run'}",
        f"data.shards={data / 'shards' / '*.tar'}",
        "trainer.max_steps=2",
        "trainer.save_every=2",
        "trainer.frozen_dtype=bf16",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
    ]
    [(dtypes, steps)] = run_ranks(_train_and_report_dtypes, 1, overrides)
    assert dtypes == {"torch.bfloat16"} and steps == 2
    assert all(math.isfinite(row["loss"]) for row in metric_rows(tmp_path / "run"))
