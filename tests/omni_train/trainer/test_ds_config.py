from __future__ import annotations

import pytest
import torch

from omni_train.trainer.config import TrainerConfig
from omni_train.trainer.ds_config import deepspeed_config, frozen_dtype


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


def test_offload_sections_and_universal_loading():
    cfg = TrainerConfig(zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    ds = deepspeed_config(cfg, 1, 2, load_universal=True)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in deepspeed_config(TrainerConfig(), 1, 1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"zero_stage": 2, "offload_param": "cpu"}, "offload_param needs trainer.zero_stage=3"),
        ({"offload_optimizer": "nvme"}, "offload_nvme_path"),
        ({"offload_optimizer": "gpu"}, "trainer.offload_optimizer='gpu'"),
    ],
)
def test_offload_mistakes_are_explained(fields, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(TrainerConfig(**fields), 1, 1)


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    cfg = TrainerConfig(precision="auto")
    assert deepspeed_config(cfg, 1, 1, cuda=True)["bf16"]["enabled"] is True
    assert deepspeed_config(cfg, 1, 1, cuda=False)["bf16"]["enabled"] is False


@pytest.mark.parametrize(
    ("frozen", "precision", "cuda", "want"),
    [
        ("auto", "bf16", False, torch.bfloat16),
        ("auto", "auto", True, torch.bfloat16),
        ("auto", "auto", False, torch.float32),
        ("auto", "fp32", True, torch.float32),
        ("fp32", "bf16", True, torch.float32),
        ("bf16", "fp32", False, torch.bfloat16),
    ],
)
def test_frozen_encoders_follow_the_run_precision_unless_set(frozen, precision, cuda, want):
    trainer = TrainerConfig(frozen_dtype=frozen, precision=precision)
    assert frozen_dtype(trainer, cuda) == want


def test_an_unknown_frozen_dtype_names_the_key():
    with pytest.raises(ValueError, match="trainer.frozen_dtype='fp16'"):
        TrainerConfig(frozen_dtype="fp16").validate()
