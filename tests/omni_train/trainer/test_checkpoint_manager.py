"""CheckpointManager on one forked rank around a stand-in engine: what it saves comes back into
new objects, and a checkpoint without an average starts the EMA at the resumed weights."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from omni_train.testing import run_ranks

LOG = logging.getLogger(__name__)
ENGINE_FILE = "engine.pt"


class StandInEngine:
    """What CheckpointManager uses of a DeepSpeed engine, over a plain module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def save_checkpoint(
        self, save_dir: str, tag: str, save_latest: bool, exclude_frozen_parameters: bool
    ) -> None:
        torch.save(self.module.state_dict(), Path(save_dir) / tag / ENGINE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str, dict]:
        path = Path(load_dir) / tag / ENGINE_FILE
        self.module.load_state_dict(torch.load(path, weights_only=True))
        return str(path), {}


class Loader:
    def __init__(self, position: dict | None) -> None:
        self.position = position or {"batches": 0}

    def state_dict(self) -> dict:
        return dict(self.position)


def _run(run_dir: Path, seed: int, data_seed: int):
    """A model, its engine and every state object, with the manager over them."""
    from omni_train.curriculum import CurriculumConfig, CurriculumMeter
    from omni_train.trainer.checkpoint_manager import CheckpointManager, LoaderPosition
    from omni_train.trainer.config import EMAConfig, TrainerConfig
    from omni_train.trainer.distributed import DistInfo
    from omni_train.trainer.ema import ShardedEMA
    from omni_train.trainer.run_state import DenoiserTrainState

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    run = SimpleNamespace(
        engine=StandInEngine(model),
        state=DenoiserTrainState(data_seed=data_seed),
        ema=ShardedEMA(model, EMAConfig(enabled=True, decay=0.5), 0, 1),
        meter=CurriculumMeter(CurriculumConfig()),
        data=LoaderPosition(Loader),
    )
    start = SimpleNamespace(
        dist=DistInfo(0, 1, 0, torch.device("cpu")),
        run_dir=run_dir,
        ckpt_root=run_dir / "checkpoints",
    )
    run.manager = CheckpointManager(
        run.engine,
        start,
        TrainerConfig(zero_stage=1, keep_last=0),
        {"experiment": "unit"},
        False,
        run.state,
        run.data,
        LOG,
        curriculum=run.meter,
        ema=run.ema,
    )
    return run


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist()]


def _weights(module: nn.Module) -> dict[str, list]:
    return {k: v.tolist() for k, v in module.state_dict().items()}


def _shadow(ema) -> dict[str, list]:
    return {k: v.tolist() for k, v in ema.shadow.items()}


def _save_then_load(run_dir: str) -> dict:
    import torch.distributed as dist

    from omni_train.trainer.run_state import plan_resume
    from omni_train.trainer.weights import DENOISER_FILE

    dist.init_process_group("gloo")
    run_dir = Path(run_dir)
    saved = _run(run_dir, seed=0, data_seed=11)
    with torch.no_grad():
        for param in saved.engine.module.parameters():
            param.add_(1.0)
    saved.ema.update(1)
    saved.state.step, saved.state.nonfinite_skipped = 5, 2
    saved.meter.flush(0, [2.0] * len(saved.meter.vector()))
    saved.data.build().position["batches"] = 7

    def export(staging: Path, weights: dict[str, torch.Tensor]) -> None:
        torch.save(weights, staging / DENOISER_FILE)

    final = saved.manager.save("cadence", export, stage=1)
    after_save = _draws()

    resumed = _run(run_dir, seed=1, data_seed=0)
    resized = resumed.manager.load(plan_resume(run_dir / "checkpoints", seed=0))
    out = {
        "final": str(final),
        "files": sorted(p.name for p in final.iterdir()),
        "meta": json.loads((final / "complete.json").read_text()),
        "resized": resized,
        "draws": (after_save, _draws()),
        "weights": (_weights(saved.engine.module), _weights(resumed.engine.module)),
        "ema": (_shadow(saved.ema), _shadow(resumed.ema)),
        "state": (saved.state.state_dict(), resumed.state.state_dict()),
        "meter": (saved.meter.state_dict(), resumed.meter.state_dict()),
        "position": resumed.data.build().position,
    }

    # Saved without an average (the run enabled the EMA on resume): it starts at the weights
    # the run resumed, not at the new model's initial ones.
    (final / "ema.safetensors").unlink()
    late = _run(run_dir, seed=2, data_seed=0)
    initial = _shadow(late.ema)
    late.manager.load(plan_resume(run_dir / "checkpoints", seed=0))
    out["late_ema"] = (initial, _shadow(late.ema))
    dist.destroy_process_group()
    return out


def test_what_the_manager_saves_comes_back_into_new_objects(tmp_path):
    [out] = run_ranks(_save_then_load, 1, str(tmp_path / "run"))
    assert Path(out["final"]).name == "step_00000005"
    assert out["files"] == [
        "complete.json",
        "config.yaml",
        "curriculum_counts.json",
        "ema.safetensors",
        ENGINE_FILE,
        "loader_rank00000.json",
        "model.safetensors",
        "rng_rank00000.json",
    ]
    meta = out["meta"]
    assert isinstance(meta.pop("time"), float)
    assert meta == {
        "step": 5,
        "data_seed": 11,
        "nonfinite_skipped": 2,
        "world_size": 1,
        "zero_stage": 1,
        "reason": "cadence",
        "stage": 1,
    }
    assert out["resized"] is False
    saved, resumed = out["weights"]
    assert resumed == saved
    saved_ema, resumed_ema = out["ema"]
    assert resumed_ema == saved_ema
    assert saved_ema != {k: torch.tensor(v).reshape(-1).tolist() for k, v in saved.items()}
    assert (
        out["state"][1] == out["state"][0] == {"step": 5, "data_seed": 11, "nonfinite_skipped": 2}
    )
    assert out["meter"][1] == out["meter"][0] and out["meter"][0]
    assert out["position"] == {"batches": 7}
    after_save, after_load = out["draws"]
    assert after_load == after_save  # every rank's random streams continue from the save
    initial, late = out["late_ema"]
    assert late != initial
    assert late == {k: torch.tensor(v).reshape(-1).tolist() for k, v in saved.items()}
