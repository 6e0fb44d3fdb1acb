"""data.batch_by_cost in a training run: each bucket's batch size comes from the cost budget,
every rank runs the same bucket at each step."""

from __future__ import annotations

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.data.bucket_cost import with_cost_batch_sizes
from omni_train.testing import compose_train_config, metric_rows, run_ranks, train_in_rank

pytestmark = pytest.mark.slow
BUCKETS = (
    "data.buckets=[{resolution:[64,64],num_frames:17,batch_size:2},"
    "{resolution:[32,32],num_frames:9,batch_size:2}]"
)


def test_two_ranks_train_cost_sized_buckets_in_step(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=4, seed=0)
    overrides = [
        "experiment=smoke",
        f"run_dir={tmp_path / 'run'}",
        f"data.shards={data / 'shards' / '*.tar'}",
        BUCKETS,
        "data.batch_by_cost=true",
        "data.sync_buckets=true",
        "data.split=sample",
        "trainer.max_steps=4",
        "trainer.save_every=4",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
    ]
    cfg, _ = compose_train_config(overrides)
    sizes = [b.batch_size for b in with_cost_batch_sizes(cfg.data, cfg.model).buckets]
    assert sizes[0] == 2 and sizes[1] > 2  # the costlier bucket keeps its size
    assert run_ranks(train_in_rank, 2, overrides) == [4, 4]
    # batch_size is summed over the 2 ranks: both ran the same bucket at every step.
    per_step = [row["batch_size"] for row in metric_rows(tmp_path / "run")]
    assert set(per_step) <= {2 * sizes[0], 2 * sizes[1]}, (per_step, sizes)
