"""Trainer, optimizer and logging configuration (defaults live here once)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    # Modules new to a pretrained text-to-video backbone (audio projector, pose guider) often
    # want a larger learning rate than the backbone: lr * new_module_lr_scale.
    new_module_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    save_every: int = 1_000
    log_every: int = 1
    keep_last: int = 3
    zero_stage: int = 2
    grad_clip: float = 1.0
    grad_accum: int = 1
    # "fp32" or "bf16"; CPU machines train in fp32 (bf16 matmul is far slower there).
    precision: str = "fp32"
    # "auto" picks nccl on CUDA and gloo on CPU.
    dist_backend: str = "auto"
    dist_timeout_minutes: int = 30
    # DeepSpeed's CPU shared-memory all-reduce needs a ~70 s C++ build on first use; gloo is
    # enough for CPU runs, so it is off unless asked for.
    cpu_shm_comm: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class WandbConfig:
    enabled: bool = True
    # "offline" writes a local run that `wandb sync` uploads later; "online" needs a network.
    mode: str = "offline"
    project: str = "omni-train"
    entity: str | None = None
    # Empty group means the experiment name.
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    console_every: int = 10
