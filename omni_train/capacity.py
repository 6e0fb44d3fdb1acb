"""Capacity planner: memory per GPU per ZeRO stage, step time at an assumed MFU, GPU-days
per curriculum stage, for a model preset on a given corpus and cluster.

    python -m omni_train.capacity model=7b resolution=[512,512] num_frames=97 corpus_hours=18700 \
        gpu=H100 num_gpus=256 mfu=0.35

Model states follow the ZeRO paper's accounting for Adam (psi = trainable parameters, N =
data-parallel ranks): bf16 keeps 2 psi weights + 2 psi gradients + 12 psi fp32 master weights
and moments; fp32 keeps 4 + 4 + 8. ZeRO-1 shards the optimizer part, ZeRO-2 also the
gradients, ZeRO-3 everything. Activations are an estimate (per layer and token, ~34 x hidden
bytes in bf16 without recomputation, ~2 x hidden with gradient checkpointing). The frozen VAE
and encoders are counted as weights only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from omni_train.curriculum.config import CurriculumConfig
from omni_train.models.config import ModelConfig
from omni_train.trainer.throughput import gpu_peak, peak_for_precision

log = logging.getLogger("omni_train.capacity")
GIB = 2**30
# Memory (GiB) of the GPUs the planner knows; their peaks are the table MFU is measured
# against (omni_train.trainer.throughput.GPU_PEAKS), at the plan's precision.
GPU_MEMORY_GB: dict[str, float] = {
    "A100-40GB": 40.0,
    "A100": 80.0,
    "H100": 80.0,  # SXM
    "H100 PCIe": 80.0,
    "H100 NVL": 94.0,
    "H200": 141.0,
}


@dataclass
class CapacityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    resolution: list[int] = field(default_factory=lambda: [512, 512])
    num_frames: int = 97
    fps: float = 25.0
    corpus_hours: float = 18_700.0
    gpu: str = "H100"
    num_gpus: int = 64
    micro_batch: int = 1
    grad_accum: int = 1
    precision: str = "bf16"
    mfu: float = 0.35
    # Total optimizer steps; each curriculum stage runs from its start_step to the next one's.
    max_steps: int = 100_000


def model_state_bytes(trainable: int, zero_stage: int, ranks: int, precision: str) -> dict:
    """Bytes per rank of weights, gradients and Adam state for ``trainable`` parameters."""
    weight, grad, optim = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    if zero_stage >= 1:
        optim /= ranks
    if zero_stage >= 2:
        grad /= ranks
    if zero_stage >= 3:
        weight /= ranks
    return {
        "weights": weight * trainable,
        "gradients": grad * trainable,
        "optimizer": optim * trainable,
    }


def activation_bytes(model: ModelConfig, tokens: int, micro_batch: int, precision: str) -> float:
    per_token_layer = (2 if model.dit.gradient_checkpointing else 34) * model.dit.hidden_size
    scale = 1 if precision == "bf16" else 2
    return per_token_layer * tokens * model.dit.depth * micro_batch * scale


def estimate(cfg: CapacityConfig) -> dict[str, Any]:
    from omni_train.models.summary import model_summary

    if cfg.gpu not in GPU_MEMORY_GB:
        raise ValueError(f"gpu={cfg.gpu!r}: use one of {', '.join(GPU_MEMORY_GB)}")
    if not 0 < cfg.mfu <= 1:
        raise ValueError(f"mfu={cfg.mfu}: use a fraction in (0, 1], e.g. 0.35")
    memory_gb = GPU_MEMORY_GB[cfg.gpu]
    # fp32 plans assume plain fp32 matmuls, as the trainer runs them (it enables no TF32).
    peak_tflops = peak_for_precision(gpu_peak(cfg.gpu), cfg.precision, tf32=False)
    summary = model_summary(cfg.model, cfg.resolution, cfg.num_frames)
    trainable, frozen = summary["trainable_params"], summary["frozen_params"]
    tokens = summary["tokens"]["video_tokens"] + summary["tokens"]["text_tokens"]
    activations = activation_bytes(cfg.model, tokens, cfg.micro_batch, cfg.precision)
    frozen_bytes = frozen * (2 if cfg.precision == "bf16" else 4)
    memory = {}
    for stage in (0, 1, 2, 3):
        states = model_state_bytes(trainable, stage, cfg.num_gpus, cfg.precision)
        total = sum(states.values()) + activations + frozen_bytes
        memory[stage] = {
            **{k: v / GIB for k, v in states.items()},
            "activations": activations / GIB,
            "frozen": frozen_bytes / GIB,
            "total": total / GIB,
            "fits": total / GIB < 0.9 * memory_gb,
        }
    global_batch = cfg.micro_batch * cfg.grad_accum * cfg.num_gpus
    step_flops = summary["train_flops_per_sample"] * global_batch
    step_s = step_flops / (cfg.num_gpus * peak_tflops * 1e12 * cfg.mfu)
    clips_per_epoch = cfg.corpus_hours * 3600 / (cfg.num_frames / cfg.fps)
    stages = []
    starts = [s.start_step for s in cfg.curriculum.stages] + [cfg.max_steps]
    for stage, start, end in zip(cfg.curriculum.stages, starts, starts[1:], strict=False):
        steps = max(0, min(end, cfg.max_steps) - start)
        stages.append(
            {
                "name": stage.name,
                "steps": steps,
                "epochs": steps * global_batch / clips_per_epoch,
                "gpu_days": steps * step_s * cfg.num_gpus / 86400,
            }
        )
    return {
        "summary": summary,
        "memory_gib": memory,
        "global_batch": global_batch,
        "step_time_s": step_s,
        "clips_per_epoch": clips_per_epoch,
        "stages": stages,
    }


def render(cfg: CapacityConfig, result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"model {cfg.model.name}: {s['trainable_params'] / 1e9:.3f}B trainable, "
        f"{s['frozen_params'] / 1e9:.3f}B frozen; {cfg.num_frames} frames at "
        f"{cfg.resolution[0]}x{cfg.resolution[1]} = {s['tokens']['video_tokens']} video tokens",
        f"{cfg.num_gpus} x {cfg.gpu}, global batch {result['global_batch']}, {cfg.precision}",
        "",
        "zero  weights  grads  optim  activ  frozen   total GiB/GPU",
    ]
    for stage, m in result["memory_gib"].items():
        lines.append(
            f"{stage:>4} {m['weights']:8.2f} {m['gradients']:6.2f} {m['optimizer']:6.2f} "
            f"{m['activations']:6.2f} {m['frozen']:7.2f} {m['total']:7.2f} "
            f"{'fits' if m['fits'] else 'OOM'}"
        )
    lines += [
        "",
        f"step time at {cfg.mfu:.0%} MFU: {result['step_time_s']:.2f} s; "
        f"{result['clips_per_epoch']:.0f} clips per epoch",
        "stage              steps   epochs   GPU-days",
    ]
    for st in result["stages"]:
        lines.append(
            f"{st['name']:<16} {st['steps']:>7} {st['epochs']:8.2f} {st['gpu_days']:10.1f}"
        )
    total = sum(st["gpu_days"] for st in result["stages"])
    lines.append(f"{'total':<16} {cfg.max_steps:>7} {'':8} {total:10.1f}")
    return "\n".join(lines)


ConfigStore.instance().store(name="capacity_schema", node=CapacityConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="capacity")
def main(raw: DictConfig) -> None:
    cfg: CapacityConfig = OmegaConf.to_object(raw)
    print(render(cfg, estimate(cfg)))


if __name__ == "__main__":
    main()
