"""A run saved by 2 ranks resumes on 1 (universal checkpoint) and keeps training, EMA included."""

from __future__ import annotations

import json
import math

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.models.weights import load_state_dict_file
from omni_train.testing import metric_rows, run_ranks, train_in_rank
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [3])
def test_two_rank_run_resumes_on_one_rank(tmp_path, zero_stage):
    data = build_sample_shards(tmp_path / "corpus", num_clips=4, seed=2)
    run_dir = tmp_path / "run"
    common = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.save_every=2",
        f"trainer.zero_stage={zero_stage}",
        "trainer.ema.enabled=true",
        "trainer.ema.decay=0.5",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
    ]
    assert run_ranks(train_in_rank, 2, [*common, "trainer.max_steps=2"]) == [2, 2]
    before = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert before["world_size"] == 2 and before["ema"]

    assert run_ranks(train_in_rank, 1, [*common, "trainer.max_steps=4"]) == [4]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["batch_size"] for r in rows] == [4, 4, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    meta = ckpt.read_meta(newest)
    assert meta["step"] == 4 and meta["world_size"] == 1
    # The loader continued the interrupted epoch (same seed, re-dealt positions).
    assert meta["data_seed"] == before["data_seed"]
    assert json.loads((newest / "loader_rank00000.json").read_text())["world_size"] == 1
    assert not (run_dir / "universal").exists()  # the converted copy is dropped after a save
    # The optimizer state travelled: the 1-rank run changed the weights it loaded.
    old = load_state_dict_file(run_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    new = load_state_dict_file(newest / "model.safetensors")
    assert any(not (old[k] == new[k]).all() for k in new)
    ema = load_state_dict_file(newest / "ema.safetensors")
    assert set(ema) == set(new)
    assert any(not (ema[k] == new[k]).all() for k in new)
