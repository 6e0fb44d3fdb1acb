"""The capacity planner: its model-state figures match what a tiny model allocates on CPU."""

from __future__ import annotations

import pytest
import torch

from omni_train.capacity import CapacityConfig, estimate, model_state_bytes, render
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def test_fp32_model_states_match_a_measured_adam_step_on_cpu():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.randn_like(p)
    optimizer.step()
    measured = {
        "weights": _tensor_bytes(trainable),
        "gradients": _tensor_bytes(p.grad for p in trainable),
        "optimizer": _tensor_bytes(
            v for state in optimizer.state.values() for k, v in state.items() if k != "step"
        ),
    }
    planned = model_state_bytes(sum(p.numel() for p in trainable), 0, 1, "fp32")
    assert planned == measured


def test_zero_stages_shard_progressively():
    full = sum(model_state_bytes(1000, 0, 8, "bf16").values())
    totals = [sum(model_state_bytes(1000, s, 8, "bf16").values()) for s in (0, 1, 2, 3)]
    assert totals[0] == full == 16_000
    assert totals == sorted(totals, reverse=True)
    assert totals[3] == pytest.approx(full / 8)


def test_estimate_of_the_tiny_model_renders_stages_and_gpu_days():
    cfg = CapacityConfig(resolution=[64, 64], num_frames=17, num_gpus=8, max_steps=60)
    result = estimate(cfg)
    assert sum(s["steps"] for s in result["stages"]) == 60
    assert result["step_time_s"] > 0
    text = render(cfg, result)
    assert "GPU-days" in text and "zero" in text


def test_unknown_gpu_is_explained():
    with pytest.raises(ValueError, match="gpu='V1'"):
        estimate(CapacityConfig(resolution=[64, 64], num_frames=17, gpu="V1"))
