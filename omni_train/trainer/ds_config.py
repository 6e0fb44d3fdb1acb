"""The DeepSpeed JSON config, generated from the Hydra config (one source of truth)."""

from __future__ import annotations

from typing import Any

import torch

from omni_train.trainer.config import TrainerConfig

_OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def resolve_precision(precision: str, cuda: bool) -> str:
    """ "auto" is bf16 on CUDA and fp32 on CPU (bf16 matmul is ~100x slower on CPUs)."""
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def _offload(device: str, nvme_path: str, key: str) -> dict[str, Any]:
    if device not in _OFFLOAD_DEVICES:
        raise ValueError(f"trainer.{key}={device!r}: use one of {', '.join(_OFFLOAD_DEVICES)}")
    if device == "nvme" and not nvme_path:
        raise ValueError(f"trainer.{key}=nvme needs trainer.offload_nvme_path=/local/nvme/dir")
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def frozen_dtype(trainer: TrainerConfig, cuda: bool) -> torch.dtype:
    """The storage dtype of the frozen encoders: trainer.frozen_dtype, "auto" = the run's precision."""
    choice = trainer.frozen_dtype
    if choice == "auto":
        choice = resolve_precision(trainer.precision, cuda)
    if choice not in ("fp32", "bf16"):
        raise ValueError(
            f"trainer.frozen_dtype={trainer.frozen_dtype!r}: use 'auto', 'fp32' or 'bf16'"
        )
    return torch.bfloat16 if choice == "bf16" else torch.float32


def deepspeed_config(
    trainer: TrainerConfig,
    micro_batch_size: int,
    world_size: int,
    cuda: bool = False,
    load_universal: bool = False,
) -> dict:
    if trainer.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage={trainer.zero_stage}: use 0, 1, 2 or 3")
    if trainer.precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"trainer.precision={trainer.precision!r}: use 'fp32', 'bf16' or 'auto'")
    if trainer.grad_accum < 1:
        raise ValueError(f"trainer.grad_accum={trainer.grad_accum}: use 1 or more")
    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if trainer.zero_stage == 3:
        # Gathers the full weights on save so an fp32 copy can be exported for inference.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if trainer.offload_optimizer != "none":
        if trainer.zero_stage == 0:
            raise ValueError("trainer.offload_optimizer needs trainer.zero_stage=1, 2 or 3")
        zero["offload_optimizer"] = _offload(
            trainer.offload_optimizer, trainer.offload_nvme_path, "offload_optimizer"
        )
    if trainer.offload_param != "none":
        if trainer.zero_stage != 3:
            raise ValueError(
                "trainer.offload_param needs trainer.zero_stage=3 (only ZeRO-3 partitions "
                "parameters); use trainer.offload_optimizer with ZeRO 1-2"
            )
        zero["offload_param"] = _offload(
            trainer.offload_param, trainer.offload_nvme_path, "offload_param"
        )
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": micro_batch_size * trainer.grad_accum * world_size,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(trainer.precision, cuda) == "bf16"},
        # The optimizer is torch's AdamW passed in by the trainer (no fused-op build).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trainer.offload_optimizer != "none":
        # torch's AdamW steps the offloaded fp32 state on the CPU (no cpu_adam op build).
        config["zero_force_ds_cpu_optimizer"] = False
    if load_universal:
        # Resuming on a different world size from a converted (universal) checkpoint.
        config["checkpoint"] = {"load_universal": True}
    return config
