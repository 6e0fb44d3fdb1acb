"""The files of a checkpoint and the keys of its JSON files stay what earlier versions of the
trainer wrote, so that their checkpoints keep resuming. The expected listing below was
recorded from a checkpoint written before the trainer saved through CheckpointManager;
change it only together with a way to resume the checkpoints it describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from data_pipelines.testing import build_sample_shards
from omni_train.testing import CHECKPOINT_LOADER_KEYS, CHECKPOINT_RNG_KEYS, run_ranks, train_in_rank
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

# File -> its top-level JSON keys (None: not JSON). 2 ranks, ZeRO-2, EMA on, step 2 of 2.
# loader_rank*.json: CHECKPOINT_LOADER_KEYS at least.
EXPECTED_LAYOUT = {
    "complete.json": [
        "data_seed",
        "ema",
        "frozen_encoders_saved",
        "nonfinite_skipped",
        "pinned",
        "reason",
        "stage",
        "step",
        "time",
        "world_size",
        "zero_stage",
    ],
    "config.yaml": None,
    "curriculum_counts.json": ["1"],
    "ema.safetensors": None,
    "frozen.safetensors": None,
    "loader_rank00000.json": CHECKPOINT_LOADER_KEYS,
    "loader_rank00001.json": CHECKPOINT_LOADER_KEYS,
    "model.safetensors": None,
    "mp_rank_00_model_states.pt": None,
    "rng_rank00000.json": CHECKPOINT_RNG_KEYS,
    "rng_rank00001.json": CHECKPOINT_RNG_KEYS,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": None,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": None,
}


def _layout(checkpoint: Path) -> dict[str, list[str] | None]:
    """Every file of ``checkpoint`` and its top-level JSON keys; the loader files' keys are
    CHECKPOINT_LOADER_KEYS when they hold at least those."""
    out: dict[str, list[str] | None] = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        keys = sorted(json.loads(path.read_text())) if path.suffix == ".json" else None
        if path.name.startswith("loader_rank") and set(CHECKPOINT_LOADER_KEYS) <= set(keys or []):
            keys = CHECKPOINT_LOADER_KEYS
        out[str(path.relative_to(checkpoint))] = keys
    return out


def _tensor_names(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_a_checkpoint_holds_the_files_and_keys_earlier_versions_wrote(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=2, seed=0)
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.max_steps=2",
        "trainer.save_every=2",
        "trainer.zero_stage=2",
        "trainer.ema.enabled=true",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
    ]
    assert run_ranks(train_in_rank, 2, overrides) == [2, 2]
    [(step, checkpoint)] = ckpt.complete_checkpoints(run_dir / "checkpoints")
    assert step == 2
    assert _layout(checkpoint) == EXPECTED_LAYOUT
    meta = ckpt.read_meta(checkpoint)
    assert {k: meta[k] for k in ("step", "world_size", "stage", "zero_stage", "reason")} == {
        "step": 2,
        "world_size": 2,
        "stage": 1,
        "zero_stage": 2,
        "reason": "cadence",
    }
    assert (meta["data_seed"], meta["nonfinite_skipped"], meta["ema"], meta["pinned"]) == (
        0,
        0,
        True,
        False,
    )
    # The EMA file is a whole denoiser file (sampling loads it in place of model.safetensors).
    assert _tensor_names(checkpoint / "ema.safetensors") == _tensor_names(
        checkpoint / "model.safetensors"
    )
