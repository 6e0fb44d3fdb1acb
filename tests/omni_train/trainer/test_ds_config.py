from __future__ import annotations

import pytest

from omni_train.trainer.config import TrainerConfig
from omni_train.trainer.ds_config import deepspeed_config


def test_batch_sizes_and_zero_stage_come_from_the_hydra_config():
    cfg = TrainerConfig(zero_stage=3, grad_accum=4, grad_clip=0.5, precision="bf16")
    ds = deepspeed_config(cfg, micro_batch_size=2, world_size=8)
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    ("field", "value", "key"), [("zero_stage", 4, "zero_stage"), ("precision", "fp8", "precision")]
)
def test_invalid_values_name_the_key(field, value, key):
    cfg = TrainerConfig(**{field: value})
    with pytest.raises(ValueError, match=f"trainer.{key}"):
        deepspeed_config(cfg, 1, 1)
