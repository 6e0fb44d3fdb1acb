"""Every use of DeepSpeed's private API, in one place.

The names below are not DeepSpeed's public interface; they are checked against the installed
release by tests/omni_train/trainer/test_deepspeed_internals.py, which also checks that the
release is in the range pyproject.toml declares. A DeepSpeed upgrade past that range must pass
that test first.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

# Where each ZeRO optimizer keeps reduced gradients of earlier micro-batches, which
# engine.zero_grad() leaves alone (the optimizer step normally consumes them).
FLAT_GRADIENT_BUFFERS = {
    "stage_1_and_2": ("grads_in_partition",),
    "stage3": ("grad_partitions_flat_buffer",),
}
PER_GROUP_GRADIENTS = {
    "stage_1_and_2": ("all_grad_tensors", "averaged_gradients"),
    "stage3": ("averaged_gradients",),
}


def discard_accumulated_gradients(engine: Any, micro: int, grad_accum: int) -> None:
    """Drop the gradients of the first ``micro`` micro-batches of a step that is skipped, and
    move the engine's micro-step counter to the next step boundary."""
    if micro == 0:
        return
    engine.zero_grad()
    optimizer = engine.optimizer
    for name in {n for names in FLAT_GRADIENT_BUFFERS.values() for n in names}:
        buffer = getattr(optimizer, name, None)
        if torch.is_tensor(buffer):
            buffer.zero_()
    for name in {n for names in PER_GROUP_GRADIENTS.values() for n in names}:
        per_group = getattr(optimizer, name, None)
        if isinstance(per_group, dict):
            for group in per_group:
                per_group[group] = None
    engine.micro_steps += grad_accum - micro


def zero3_full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, every rank joins in gathering the partitioned parameters; the main rank
    gets the full state dict, the others None."""
    return engine._zero3_consolidated_16bit_state_dict()


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory op (~70 s on a new
    machine) when gloo does the communication anyway."""
    import deepspeed.comm.torch  # noqa: F401 - registers the module patched below

    # Through sys.modules: the attribute `deepspeed.comm.torch` is the torch package itself
    # (re-exported by a star import), not DeepSpeed's backend module.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def pickled_optimizer_classes() -> list[type]:
    """The DeepSpeed classes pickled in its ZeRO 1-3 optimizer state (fp32 and bf16): an int
    enum, a dataclass of two ints and the static loss scaler's two attributes. Rebuilding them
    runs no code beyond setting fields."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
