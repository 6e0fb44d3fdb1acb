"""A run saved by 2 ranks resumes on 1 (universal checkpoint): weights, Adam moments and EMA
arrive as saved and training goes on; a data position that cannot be carried over stops the
run before training unless trainer.allow_new_data_order accepts a new order."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.testing import build_sample_shards
from omni_train.testing import compose_train_config, metric_rows, run_ranks, train_in_rank
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer.checkpoint_manager import load_resumed
from omni_train.trainer.run_state import ResumePlan, resized_data_seed

SAVED = "step_00000002"


def _overrides(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.save_every=2",
        "trainer.zero_stage=3",
        "trainer.ema.enabled=true",
        "trainer.ema.decay=0.5",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> SimpleNamespace:
    """2 steps on 2 ranks (ZeRO-3, EMA), and DeepSpeed's own universal conversion of the
    saved checkpoint: the reference for what a resume must load."""
    root = tmp_path_factory.mktemp("elastic_resume")
    data = build_sample_shards(root / "corpus", num_clips=4, seed=2)
    run_dir = root / "run"
    assert run_ranks(train_in_rank, 2, _overrides(run_dir, data, "trainer.max_steps=2")) == [2, 2]
    source = root / "source"  # the converter may add universal info to its input: a copy
    shutil.copytree(run_dir / "checkpoints" / SAVED, source)
    reference = root / "reference"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            f"--input_folder={source}",
            f"--output_folder={reference}",
            "--inject_missing_state",
            "--num_extract_workers=1",
            "--num_merge_workers=1",
        ],
        check=True,
        capture_output=True,
    )
    return SimpleNamespace(data=data, run_dir=run_dir, reference=reference / "zero")


def _run_copy(saved_run, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run.run_dir, run_dir)
    return run_dir


def _numpy(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().float().cpu().numpy().copy()


def _universal(path: Path) -> np.ndarray:
    """One state of one parameter in a universal checkpoint, flat (ZeRO-3 writes it flat)."""
    value = torch.load(path, weights_only=True)
    return (value["param"] if isinstance(value, dict) else value).detach().reshape(-1).numpy()


def _loaded_then_trained(overrides: list[str]) -> tuple[int, dict, dict]:
    """In a rank: build the Trainer (the resume happens there), record the full weights,
    Adam moments and EMA it loaded, then train."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from omni_train.trainer.trainer import Trainer

    def moment(param, key: str) -> np.ndarray | None:
        try:
            return _numpy(safe_get_full_optimizer_state(param, key))
        except KeyError:  # an optimizer that never stepped nor loaded has no moments
            return None

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    loaded = {
        name: {
            "fp32": _numpy(safe_get_full_fp32_param(param)),
            "exp_avg": moment(param, "exp_avg"),
            "exp_avg_sq": moment(param, "exp_avg_sq"),
        }
        for name, param in trainer.engine.module.named_parameters()
        if param.requires_grad
    }
    ema = {name: _numpy(t) for name, t in trainer.ema.gather(dist.get_rank() == 0).items()}
    trainer.run()
    dist.destroy_process_group()
    return trainer.global_step, loaded, ema


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank_with_the_saved_state(saved_run, tmp_path):
    run_dir = _run_copy(saved_run, tmp_path)
    overrides = _overrides(run_dir, saved_run.data, "trainer.max_steps=4")
    before = ckpt.read_meta(run_dir / "checkpoints" / SAVED)
    assert before["world_size"] == 2 and before["ema"]

    [(step, loaded, ema)] = run_ranks(_loaded_then_trained, 1, overrides)
    assert step == 4
    # What the resumed engine holds is what the 2 ranks saved, to the bit (fp32 run).
    saved_weights = load_file(str(run_dir / "checkpoints" / SAVED / "model.safetensors"))
    saved_ema = load_file(str(run_dir / "checkpoints" / SAVED / "ema.safetensors"))
    assert loaded and set(loaded) == set(ema)
    moved = 0
    for name, state in loaded.items():
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            assert state[kind] is not None, f"{name}: no {kind} after the resume"
            reference = _universal(saved_run.reference / name / f"{kind}.pt")
            np.testing.assert_array_equal(state[kind].reshape(-1), reference, err_msg=name)
        np.testing.assert_array_equal(state["fp32"], saved_weights[name].numpy(), err_msg=name)
        np.testing.assert_array_equal(ema[name], saved_ema[name].numpy(), err_msg=name)
        moved += bool(np.any(state["exp_avg_sq"]))
    # Not zeros matching zeros: the parameters that had gradients carry their moments.
    assert moved > 0

    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["batch_size"] for r in rows] == [4, 4, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    meta = ckpt.read_meta(newest)
    assert meta["step"] == 4 and meta["world_size"] == 1
    # The loader continued the interrupted epoch (same seed, re-dealt positions).
    assert meta["data_seed"] == before["data_seed"]
    loader = json.loads((newest / "loader_rank00000.json").read_text())
    assert loader["world_size"] == 1 and loader["handover"]["generation"] == 1
    assert not (run_dir / "universal").exists()  # the converted copy is dropped after a save
    # The 1-rank run trained on: its weights and EMA moved away from the loaded ones.
    new = load_file(str(newest / "model.safetensors"))
    new_ema = load_file(str(newest / "ema.safetensors"))
    assert any(not torch.equal(saved_weights[k], new[k]) for k in loaded)
    assert any(not torch.equal(new_ema[k], new[k]) for k in loaded)


def _resume_with_a_refused_redeal(overrides: list[str]) -> tuple[str, int, int | None]:
    """In a rank: resume while the loader re-deal refuses the saved position.

    Returns (the error, or "" when the Trainer was built, step reached, its data seed)."""
    import torch.distributed as dist

    import omni_train.trainer.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise ValueError("forced: this position cannot be re-dealt")

    trainer_module.elastic_loader_state = refuse
    cfg, resolved = compose_train_config(overrides)
    try:
        trainer = trainer_module.Trainer(cfg, resolved)
    except trainer_module.DataOrderError as err:
        dist.destroy_process_group()
        return str(err), 0, None
    trainer.run()
    dist.destroy_process_group()
    return "", trainer.global_step, trainer.state.data_seed


@pytest.mark.slow
def test_a_position_that_cannot_be_re_dealt_stops_unless_a_new_order_is_allowed(
    saved_run, tmp_path
):
    run_dir = _run_copy(saved_run, tmp_path)
    overrides = _overrides(run_dir, saved_run.data, "trainer.max_steps=3")
    saved_seed = ckpt.read_meta(run_dir / "checkpoints" / SAVED)["data_seed"]

    [(error, step, _)] = run_ranks(_resume_with_a_refused_redeal, 1, overrides)
    assert "forced: this position cannot be re-dealt" in error
    assert "trainer.allow_new_data_order=true" in error and SAVED in error
    # Stopped while building the trainer: no step trained, nothing saved.
    assert step == 0 and [r["step"] for r in metric_rows(run_dir)] == [1, 2]
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == SAVED

    allowed = [*overrides, "trainer.allow_new_data_order=true"]
    [(error, step, data_seed)] = run_ranks(_resume_with_a_refused_redeal, 1, allowed)
    assert (error, step) == ("", 3)
    assert data_seed == resized_data_seed(saved_seed, 2) != saved_seed
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.read_meta(newest)["data_seed"] == data_seed
    loader = json.loads((newest / "loader_rank00000.json").read_text())
    # A fresh order from the new seed: no handover, one batch read.
    assert (loader["seed"], loader["handover"], loader["batches"]) == (data_seed, None, 1)


def test_a_checkpoint_deepspeed_loads_nothing_from_stops_the_resume(tmp_path):
    class LoadsNothing:  # DeepSpeed's answer when the tag's files are missing or unreadable
        def load_checkpoint(self, load_dir, **kwargs):
            return None, None

    root = tmp_path / "checkpoints"
    plan = ResumePlan(root / SAVED, 2, 1, 0, {})
    with pytest.raises(RuntimeError, match=rf"DeepSpeed loaded nothing from \S*{SAVED}"):
        load_resumed(LoadsNothing(), plan, False, None, root, tmp_path, logging.getLogger())
