from __future__ import annotations

import math

import pytest

from omni_train.trainer.config import OptimizerConfig
from omni_train.trainer.lr_schedule import lr_factor, lr_lambda


def test_warmup_is_linear_then_constant():
    cfg = OptimizerConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_the_end_of_warmup_to_the_floor():
    cfg = OptimizerConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(9, cfg, 110) == 1.0
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)
    values = [lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_decay_honours_decay_steps():
    cfg = OptimizerConfig(schedule="linear", decay_steps=50)
    assert lr_factor(25, cfg, 1000) == pytest.approx(0.5)
    assert lr_factor(50, cfg, 1000) == 0.0
    assert math.isclose(lr_factor(0, cfg, 1000), 1.0)


@pytest.mark.parametrize(
    ("fields", "key"),
    [({"schedule": "step"}, "schedule"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")],
)
def test_bad_values_name_the_key(fields, key):
    with pytest.raises(ValueError, match=f"trainer.optimizer.{key}"):
        lr_lambda(OptimizerConfig(**fields), 100)
