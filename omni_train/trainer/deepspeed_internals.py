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


def zero3_full_state_dict(
    engine: Any, exclude_frozen_parameters: bool = False
) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, every rank joins in gathering the partitioned parameters; the main rank
    gets the full state dict (without the frozen parameters if asked: they are not
    gathered), the others None."""
    return engine._zero3_consolidated_16bit_state_dict(
        exclude_frozen_parameters=exclude_frozen_parameters
    )


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


def model_state_tensors(engine: Any) -> dict[str, list[torch.Tensor]]:
    """The tensors holding this rank's model states: "weights" (the module's parameters and,
    under ZeRO-3, their partitions), "gradients" (the parameters' .grad and the optimizer's
    gradient buffers above) and "optimizer" (the inner torch optimizer's state and, under
    ZeRO, its parameters: the fp32 master partitions). Tensors may share storage."""
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    weights = params + [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
    gradients = [p.grad for p in params if p.grad is not None]
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # a ZeRO optimizer wraps torch's
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    masters = [] if stage == 0 else [p for g in inner.param_groups for p in g["params"]]
    if stage >= 1:
        kind = "stage3" if stage == 3 else "stage_1_and_2"
        names = FLAT_GRADIENT_BUFFERS[kind] + PER_GROUP_GRADIENTS[kind]
        gradients += _tensors_in([getattr(optimizer, name, None) for name in names])
        gradients += [p.grad for p in masters if p.grad is not None]
    return {"weights": weights, "gradients": gradients, "optimizer": masters + state}


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []
