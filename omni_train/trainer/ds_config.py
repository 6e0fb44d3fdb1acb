"""The DeepSpeed JSON config, generated from the Hydra config (one source of truth)."""

from __future__ import annotations

from typing import Any

from omni_train.trainer.config import TrainerConfig


def deepspeed_config(trainer: TrainerConfig, micro_batch_size: int, world_size: int) -> dict:
    if trainer.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage={trainer.zero_stage}: use 0, 1, 2 or 3")
    if trainer.precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision={trainer.precision!r}: use 'fp32' or 'bf16'")
    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if trainer.zero_stage == 3:
        # Gathers the full weights on save so an fp32 copy can be exported for inference.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": micro_batch_size * trainer.grad_accum * world_size,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": trainer.precision == "bf16"},
        # The optimizer is torch's AdamW passed in by the trainer (no fused-op build).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
