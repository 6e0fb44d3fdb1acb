"""The capacity planner: its memory model (ZeRO stages, offload, frozen bases), plans and the
VRAM table. tests/omni_train/test_capacity_measured.py holds it against real engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_train import capacity
from omni_train.capacity import (
    GIB,
    TABLE_SETUPS,
    CapacityConfig,
    estimate,
    exchange_seconds,
    longest_clip_table,
    longest_latent_frames,
    memory_per_gpu,
    model_state_bytes,
    persistent_params,
    plan_cost,
    render,
    render_longest_clips,
    render_table,
    render_table_summary,
    transient_bytes,
    vram_table,
)
from omni_train.describe import model_preset
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.summary import encoder_parameter_counts
from omni_train.models.training_cost import ParameterCounts, TrainingCost

ROOT = Path(__file__).resolve().parents[2]


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
        "host": 0,
    }
    planned = model_state_bytes(sum(p.numel() for p in trainable), 0, 1, "fp32")
    assert planned == measured


def test_zero_stages_shard_progressively():
    full = sum(model_state_bytes(1000, 0, 8, "bf16").values())
    totals = [sum(model_state_bytes(1000, s, 8, "bf16").values()) for s in (0, 1, 2, 3)]
    assert totals[0] == full == 16_000
    assert totals == sorted(totals, reverse=True)
    assert totals[3] == pytest.approx(full / 8)


def test_frozen_weights_are_sharded_only_by_zero3_and_persistent_ones_stay_whole():
    # 1000 trainable, 4000 frozen parameters on 8 ranks in bf16.
    stage2 = model_state_bytes(1000, 2, 8, "bf16", frozen=4000)
    assert stage2 == {"weights": 10_000, "gradients": 250, "optimizer": 1500, "host": 0}
    stage3 = model_state_bytes(1000, 3, 8, "bf16", frozen=4000, persistent=(100, 200))
    assert stage3 == {"weights": 1250 + 600, "gradients": 250, "optimizer": 1500, "host": 0}
    assert model_state_bytes(1000, 1, 8, "fp32")["optimizer"] == 12 * 1000 / 8
    assert model_state_bytes(1000, 3, 8, "fp32")["optimizer"] == 8 * 1000 / 8


def test_offload_moves_optimizer_state_gradients_and_weights_to_the_host():
    stage1 = model_state_bytes(1000, 1, 8, "bf16", frozen=4000, offload_optimizer="cpu")
    assert stage1 == {"weights": 10_000, "gradients": 250, "optimizer": 0, "host": 1500}
    stage2 = model_state_bytes(1000, 2, 8, "bf16", frozen=4000, offload_optimizer="cpu")
    assert stage2 == {"weights": 10_000, "gradients": 0, "optimizer": 0, "host": 1750}
    stage3 = model_state_bytes(
        1000, 3, 8, "bf16", 4000, (100, 200), offload_optimizer="cpu", offload_param="cpu"
    )
    assert stage3 == {"weights": 600, "gradients": 0, "optimizer": 0, "host": 1250 + 1750}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_stage": 2, "offload_param": "cpu"}, "offload_param needs zero_stage 3"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer needs zero_stage"),
        ({"zero_stage": 3, "offload_param": "disk"}, "offload_param='disk'"),
    ],
)
def test_impossible_offload_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_state_bytes(1000, kwargs.pop("zero_stage"), 8, "bf16", **kwargs)


def test_transient_memory_follows_deepspeeds_buckets():
    # 2e9 trainable parameters, 8 ranks, bf16, a largest module of 1e8 parameters.
    args = (2_000_000_000, 100_000_000)
    assert transient_bytes(*args, 0, 8, "bf16") == 0
    assert transient_bytes(*args, 1, 8, "bf16") == 2 * 2e9 * 7 / 8
    assert transient_bytes(*args, 2, 8, "bf16") == 2 * 5e8
    assert transient_bytes(*args, 3, 8, "bf16") == 2 * 5e8 + 2 * (1e8 + 5e7)
    assert transient_bytes(1000, 10, 2, 8, "bf16") == 2 * 1000


def _cost(mode: str) -> TrainingCost:
    params = ParameterCounts(
        base=3000,
        new_modules=1000,
        lora_adapters=500,
        lora_rank=4,
        numels={"base": (2900, 100), "new_modules": (1000,), "lora_adapters": (500,)},
        largest_module=10,
    )
    return TrainingCost(mode, params, 0, 0, saved_bytes=900, activation_bytes=700)


def test_persistent_parameters_follow_the_mode():
    params = ParameterCounts(
        base=300_000,
        new_modules=1000,
        lora_adapters=500,
        lora_rank=4,
        numels={
            "base": (200_000, 100_000, 99_999, 1),
            "new_modules": (1000,),
            "lora_adapters": (500,),
        },
        largest_module=10,
    )
    assert persistent_params(params, "full") == (1000 + 99_999 + 1, 0)
    assert persistent_params(params, "new_modules") == (1000, 100_000)
    assert persistent_params(params, "lora") == (1500, 100_000)


def test_memory_per_gpu_adds_activations_encoders_and_transients():
    lora = memory_per_gpu(_cost("lora"), 50, 2, 8, "bf16", micro_batch=3)
    assert lora["weights"] == 2 * (1500 + 3000)
    assert lora["gradients"] == 2 * 1500 / 8 and lora["optimizer"] == 12 * 1500 / 8
    # The frozen encoders are stored in the run's precision (trainer.frozen_dtype=auto).
    assert lora["activations"] == 3 * 700 and lora["encoders"] == 2 * 50
    assert lora["transient"] == 2 * 1500
    parts = ("weights", "gradients", "optimizer", "activations", "encoders", "transient")
    assert lora["total"] == sum(lora[k] for k in parts)
    full = memory_per_gpu(_cost("full"), 50, 3, 8, "bf16", 1, "cpu", "cpu")
    assert full["weights"] == 2 * 4000  # every tensor is below the persistence threshold
    assert full["host"] == (2 + 2 + 12) * 4000 / 8
    assert memory_per_gpu(_cost("full"), 50, 3, 8, "fp32", 1)["encoders"] == 4 * 50


def test_estimate_of_the_tiny_model_renders_stages_and_gpu_days():
    cfg = CapacityConfig(resolution=[64, 64], num_frames=17, num_gpus=8, max_steps=60)
    result = estimate(cfg)
    assert sum(s["steps"] for s in result["stages"]) == 60
    assert result["step_time_s"] > 0
    assert list(result["memory_gib"]) == [0, 1, 2, 3]
    text = render(cfg, result)
    assert "GPU-days" in text and "zero" in text and "host GiB/rank" in text


def test_offload_plans_only_the_stages_that_allow_it():
    cfg = CapacityConfig(
        model=model_preset("wan_tiny"), resolution=[32, 32], num_frames=5, num_gpus=8
    )
    cfg.finetune.mode = "lora"
    cfg.offload_optimizer = "cpu"
    assert list(estimate(cfg)["memory_gib"]) == [1, 2, 3]
    cfg.offload_param = "cpu"
    memory = estimate(cfg)["memory_gib"]
    assert list(memory) == [3] and memory[3]["host"] > 0


def test_unknown_gpu_is_explained():
    with pytest.raises(ValueError, match="gpu='V1'"):
        estimate(CapacityConfig(resolution=[64, 64], num_frames=17, gpu="V1"))


def test_vram_table_rows_cover_models_modes_and_setups():
    cfg = CapacityConfig(resolution=[32, 32], num_frames=5, num_gpus=8)
    models = {"tiny": ModelConfig(), "wan_tiny": model_preset("wan_tiny")}
    rows = vram_table(cfg, models)
    assert len(rows) == 2 * 3 * 4
    keyed = {(r["model"], r["mode"], r["zero"], r["offload"]): r for r in rows}
    lora2, lora3 = keyed["wan_tiny", "lora", 2, "none"], keyed["wan_tiny", "lora", 3, "none"]
    # The frozen base is sharded by ZeRO-3 only; the toy's tensors all stay whole besides.
    whole = 2 * sum(persistent_params(plan_cost(cfg, models["wan_tiny"], "lora").params, "lora"))
    assert lora3["weights"] == pytest.approx(lora2["weights"] / 8 + whole / GIB)
    assert keyed["wan_tiny", "lora", 2, "cpu"]["optimizer"] == 0
    assert keyed["tiny", "full", 3, "cpu"]["host"] > 0
    assert all(r["fits"] for r in rows)  # toy models
    text = render_table(cfg, rows)
    assert text.count("\n| ") == len(rows) + 2 and "32x32, 5 frames" in text
    summary = render_table_summary(cfg, rows).splitlines()
    assert summary[-1].startswith("| wan_tiny | lora |") and len(summary) == 4 + 2 * 3
    totals = [f"{keyed['wan_tiny', 'lora', z, o]['total']:.1f}" for z, o in TABLE_SETUPS]
    assert summary[-1].endswith(" | ".join(totals) + " |")


def test_cli_prints_the_table():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    args = ["table=true", "table_models=[tiny]", "resolution=[32,32]", "num_frames=5"]
    result = subprocess.run(
        [sys.executable, "-m", "omni_train.capacity", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 3 + 3 * 4  # the summary, then the breakdown


# Sequence parallelism ----------------------------------------------------------------------


def test_exchanges_run_over_nvlink_within_a_node_and_the_network_across():
    cfg = CapacityConfig(gpu="H100", link_efficiency=0.5, inter_node_gb_s=40.0)
    assert exchange_seconds(cfg, 9e9, 1) == 0.0
    # 4 ranks on one node: all 9 GB over NVLink at 450 x 0.5 GB/s.
    assert exchange_seconds(cfg, 9e9, 4) == pytest.approx(9e9 / 225e9)
    # 16 ranks over 2 nodes of 8: 7 of 15 peers share the node, 8 are across (at 20 GB/s).
    assert exchange_seconds(cfg, 15e9, 16) == pytest.approx(8e9 / 20e9)
    cfg.intra_node_gb_s = 10.0
    assert exchange_seconds(cfg, 15e9, 16) == pytest.approx(7e9 / 5e9)


def test_a_sequence_parallel_plan_shards_activations_and_adds_the_exchanges():
    base = {"resolution": [32, 32], "num_frames": 9, "num_gpus": 8, "max_steps": 10}
    cfg = CapacityConfig(**base, sequence_parallel=2, precision="fp32")
    result = estimate(cfg)
    cost = plan_cost(cfg)
    unsharded = plan_cost(cfg, sequence_parallel=1)
    assert (cost.sequence_parallel, unsharded.sequence_parallel) == (2, 1)
    assert cost.activation_bytes < unsharded.activation_bytes
    assert cost.train_flops < unsharded.train_flops
    assert result["global_batch"] == 4
    assert result["sent_bytes_per_sample"] == cost.sent_bytes > 0
    peak = 67e12 * cfg.mfu  # H100 fp32
    assert result["compute_time_s"] == pytest.approx(cost.train_flops / peak)
    assert result["exchange_time_s"] == pytest.approx(cost.sent_bytes / (450e9 * 0.7))
    assert result["step_time_s"] == result["compute_time_s"] + result["exchange_time_s"]
    zero2 = result["memory_gib"][2]
    assert zero2["activations"] * GIB == cost.activation_bytes
    assert zero2["transient"] * GIB == pytest.approx(
        transient_bytes(cost.params.trainable("full"), cost.params.largest_module, 2, 8, "fp32")
        + 3 * cost.largest_exchange_bytes
    )
    text = render(cfg, result)
    assert "sequence parallel 2: 4 data-parallel replicas" in text and "exchanges" in text
    assert "8 x H100, sequence parallel 2, global batch 4" in text
    assert "sequence parallel" not in render(
        CapacityConfig(**base), estimate(CapacityConfig(**base))
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"sequence_parallel": 3}, "sequence_parallel=3 must be >= 1 and divide num_gpus=8"),
        ({"sequence_parallel": 0}, "sequence_parallel=0"),
        ({"link_efficiency": 1.5}, "link_efficiency=1.5"),
        ({"gpus_per_node": 0}, "gpus_per_node=0"),
    ],
)
def test_bad_sequence_parallel_plans_are_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        estimate(CapacityConfig(resolution=[32, 32], num_frames=9, num_gpus=8, **overrides))


def test_sequence_parallel_must_divide_the_heads_and_leave_each_rank_a_frame():
    cfg = CapacityConfig(resolution=[32, 32], num_frames=9, num_gpus=6, sequence_parallel=3)
    with pytest.raises(ValueError, match=r"does not divide model.dit.num_heads=4.*\[1, 2, 4\]"):
        estimate(cfg)
    cfg = CapacityConfig(resolution=[32, 32], num_frames=5, num_gpus=4, sequence_parallel=4)
    with pytest.raises(ValueError, match="more than the clip's 2 latent frames"):
        estimate(cfg)


def _affine(a: float, b: float, c: float, sp: int, calls: list[int]):
    def total(latent: int) -> float:
        calls.append(latent)
        return a + b * -(-latent // sp) + c * latent

    return total


@pytest.mark.parametrize("sp", [1, 2, 3, 8])
def test_the_longest_clip_search_finds_the_last_frame_count_that_fits(sp):
    calls: list[int] = []
    total = _affine(10.0, 0.7, 0.05, sp, calls)
    expected = max(n for n in range(sp, 2000) if total(n) < 72.0)
    calls.clear()
    assert longest_latent_frames(total, 72.0, sp, 2000) == expected
    # The model's three counts, then the guess and its neighbour.
    assert len(calls) == (2 if sp == 1 else 3) + 2
    assert longest_latent_frames(total, 72.0, sp, expected - 5) == expected - 5  # the ceiling
    assert longest_latent_frames(total, 1.0, sp, 2000) == sp - 1  # nothing fits


def test_the_longest_clip_search_walks_to_the_answer_when_memory_is_not_affine():
    # Quadratic growth: the affine guess from small counts overshoots; exact counts correct it.
    def total(latent: int) -> float:
        return 5.0 + 0.002 * latent**2

    expected = max(n for n in range(1, 1000) if total(n) < 70.0)
    assert longest_latent_frames(total, 70.0, 1, 1000) == expected
    # Concave growth: the guess falls short; the search doubles up from it.
    assert longest_latent_frames(lambda n: 5.0 + 3.0 * n**0.5, 70.0, 2, 1000) == 469


def test_the_longest_clip_table_marks_sizes_the_heads_refuse(monkeypatch):
    # A 0.25 GB GPU, so that the tiny model runs out at a few dozen frames.
    monkeypatch.setitem(capacity.GPU_MEMORY_GB, "H100", 0.25)
    cfg = CapacityConfig(resolution=[64, 64], num_gpus=2, precision="fp32", longest_modes=["full"])
    cfg.longest_sp_sizes = [1, 2, 3]
    [row] = longest_clip_table(cfg, {"tiny": ModelConfig()})
    frames = row["frames"]
    assert frames[3] is None  # 4 heads
    encoders = sum(encoder_parameter_counts(ModelConfig()).values())
    for sp in (1, 2):
        latent = 1 + (frames[sp] - 1) // 4
        gib = [
            capacity._gib_per_gpu(cfg, ModelConfig(), encoders, "full", sp, n)
            for n in (latent, latent + 1)
        ]
        assert gib[0] < 0.9 * 0.25 <= gib[1], (sp, frames[sp], gib)
    assert frames[2] > frames[1]
    text = render_longest_clips(cfg, [row])
    assert text.splitlines()[-1] == (
        f"| tiny | full | {frames[1]} ({frames[1] / 25:.1f} s) | {frames[2]} "
        f"({frames[2] / 25:.1f} s) | - |"
    )
