"""Each piece of run state a checkpoint keeps comes back from its state dict as it was."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from omni_train.curriculum import CurriculumConfig, CurriculumMeter
from omni_train.curriculum.stats import count_names
from omni_train.trainer.checkpoint_manager import LoaderPosition
from omni_train.trainer.config import EMAConfig
from omni_train.trainer.ema import ShardedEMA
from omni_train.trainer.run_state import DenoiserTrainState, RNGState, TrainState


def test_train_state_dicts_hold_the_counters_complete_json_has_always_held():
    assert TrainState(step=7, data_seed=3).state_dict() == {"step": 7, "data_seed": 3}
    state = DenoiserTrainState(step=7, data_seed=3, nonfinite_skipped=2)
    assert state.state_dict() == {"step": 7, "data_seed": 3, "nonfinite_skipped": 2}
    # complete.json carries more keys than the counters; the counters take theirs.
    resumed = DenoiserTrainState(data_seed=99)
    resumed.load_state_dict({**state.state_dict(), "world_size": 2, "reason": "cadence"})
    assert resumed == state


def test_a_checkpoint_without_a_data_seed_or_skip_count_keeps_the_runs_seed_and_counts_zero():
    resumed = DenoiserTrainState(data_seed=5, nonfinite_skipped=4)
    resumed.load_state_dict({"step": 9})
    assert resumed == DenoiserTrainState(step=9, data_seed=5, nonfinite_skipped=0)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_restores_every_global_stream():
    rng = RNGState()
    saved = rng.state_dict()
    expected = _draws()
    _draws()
    rng.load_state_dict(saved)
    assert _draws() == expected


def _meter_with_counts(cfg: CurriculumConfig, value: float) -> CurriculumMeter:
    meter = CurriculumMeter(cfg)
    meter.flush(0, [value] * len(meter.vector()))
    return meter


def test_curriculum_meter_continues_its_stage_totals_after_a_load():
    cfg = CurriculumConfig()
    saved = _meter_with_counts(cfg, 2.0)
    resumed = CurriculumMeter(cfg)
    resumed._pending += 5.0  # counts of the interval before the load are not the run's
    resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict() == saved.state_dict()
    assert resumed.vector() == [0.0] * len(resumed.vector())
    counts = [1.0] * len(saved.vector())
    assert resumed.flush(1, counts) == saved.flush(1, counts)
    assert resumed.state_dict()["1"]["samples"] == 3.0
    assert set(resumed.state_dict()["1"]) == set(count_names())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _move(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(by)


def test_ema_state_dict_round_trips_and_restart_starts_at_the_current_weights():
    model = _model()
    ema = ShardedEMA(model, EMAConfig(enabled=True, decay=0.5), 0, 1)
    _move(model, 1.0)
    ema.update(1)
    saved = ema.state_dict()
    loaded = ShardedEMA(_model(), EMAConfig(enabled=True, decay=0.5), 0, 1)
    loaded.load_state_dict(saved)
    assert all(torch.equal(loaded.shadow[n], ema.shadow[n]) for n in ema.shadow)

    _move(model, 1.0)
    ema.restart()
    weights = dict(model.named_parameters())
    assert all(torch.equal(ema.shadow[n], weights[n].reshape(-1)) for n in ema.shadow)


class _Loader:
    def __init__(self, position):
        self.position = position

    def state_dict(self):
        return {"batches": 3}


def test_loader_position_reaches_the_loader_when_it_is_built():
    data = LoaderPosition(_Loader)
    data.load_state_dict({"batches": 2})
    assert data.build().position == {"batches": 2}
    assert data.state_dict() == {"batches": 3}
    with pytest.raises(RuntimeError, match="load its position before build"):
        data.load_state_dict({"batches": 1})
    assert LoaderPosition(_Loader).build().position is None  # a new run starts at the top
    with pytest.raises(RuntimeError, match="call build"):
        LoaderPosition(_Loader).state_dict()
