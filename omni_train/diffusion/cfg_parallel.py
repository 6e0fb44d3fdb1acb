"""CFG-parallel sampling: the guidance passes of each denoising step on different ranks.

Under ``torchrun --nproc_per_node W`` (W <= 3) every rank runs the same sampling loop. At each
step the passes guided_velocity needs (unconditional, text, text + audio; one conditional
pass at unit scales) are dealt to the ranks in order, contiguously (W=3: one each, W=2: two
and one, one pass: rank 0 alone), each rank runs the denoiser on its own passes in one
batched call, the velocities are all-gathered and every rank combines them with
combine_passes, so all ranks take the same Euler step. Segments of a long video still follow
one another; rank 0's noise and motion latents are broadcast, so a generator that drifted on
another rank changes nothing.

With ``sequence_parallel=N`` the passes go to W / N slots of N ranks that split each call's
frames (omni_train/diffusion/sequence_parallel_sampling.py).

Batching differs from one process (there the three passes are one call of batch 3B), so the
latents agree with it to matmul rounding (~1e-6), not bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from omni_train.diffusion.sampler import GuidedModelFn, combine_passes, guidance_passes
from omni_train.diffusion.sequence_parallel_sampling import (
    SETTING,
    check_layout,
    gather_pass_velocities,
    sequence_parallel_group,
)
from omni_train.models.sequence_parallel import SequenceParallel

log = logging.getLogger(__name__)

# Passes of a guided step (unconditional, text, text + audio): more ranks would always idle.
MAX_RANKS = 3


def deal_passes(num_passes: int, world_size: int) -> list[list[int]]:
    """The pass indices each rank runs: in order, contiguous, the larger shares first."""
    base, extra = divmod(num_passes, world_size)
    plan, start = [], 0
    for rank in range(world_size):
        count = base + (rank < extra)
        plan.append(list(range(start, start + count)))
        start += count
    return plan


def check_world_size(world_size: int, sequence_parallel: int = 1) -> None:
    check_layout(world_size, sequence_parallel)
    if world_size <= MAX_RANKS * sequence_parallel:
        return
    if sequence_parallel > 1:
        raise ValueError(
            f"WORLD_SIZE={world_size} with {SETTING}={sequence_parallel}: CFG-parallel "
            f"sampling deals the {MAX_RANKS} guidance passes to at most {MAX_RANKS} groups of "
            f"{sequence_parallel} ranks, so {world_size - MAX_RANKS * sequence_parallel} would "
            f"only wait; launch with --nproc_per_node {MAX_RANKS * sequence_parallel} or fewer"
        )
    raise ValueError(
        f"WORLD_SIZE={world_size}: CFG-parallel sampling deals the {MAX_RANKS} guidance "
        f"passes (unconditional, text, text + audio) to at most {MAX_RANKS} ranks, so "
        f"{world_size - MAX_RANKS} would only wait; launch with --nproc_per_node "
        f"{MAX_RANKS} or fewer"
    )


@dataclass
class CFGParallel:
    """The ranks of ``group`` (the default group when None) sampling together. With
    ``sequence_parallel`` (this rank's SP group, of consecutive ranks) the passes are dealt to
    the groups (slots) and each call returns the velocity of this rank's frames."""

    group: Any = None
    sequence_parallel: SequenceParallel | None = None
    rank: int = field(init=False)
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        check_world_size(self.world_size, self.sp_size)

    @property
    def sp_size(self) -> int:
        return 1 if self.sequence_parallel is None else self.sequence_parallel.size

    @property
    def slots(self) -> int:
        """Groups of sp_size ranks the guidance passes are dealt to."""
        return self.world_size // self.sp_size

    @property
    def slot(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(
        self,
        make: Callable[[], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> torch.Tensor:
        """``make()`` called on rank 0 (a tensor of ``shape`` and ``dtype``), on every rank."""
        if self.is_main:
            tensor = make().contiguous()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(
                    f"rank 0 made a {tuple(tensor.shape)} {tensor.dtype} tensor where the other "
                    f"ranks expect {tuple(shape)} {dtype}"
                )
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, source, self.group)
        return tensor

    def velocity(
        self,
        model_fn: GuidedModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        text_scale: float,
        audio_scale: float,
    ) -> torch.Tensor:
        """guided_velocity, with this rank running only its slot's share of the passes (of
        its own frames under sequence parallelism: ``model_fn`` returns only those)."""
        passes = guidance_passes(text_scale, audio_scale)
        plan = deal_passes(len(passes), self.slots)
        mine = plan[self.slot]
        batch, frames = x.shape[0], x.shape[2]
        local = x.new_empty((0, x.shape[1], 0, *x.shape[3:]))  # a slot without a pass
        if mine:
            count = len(mine)
            text_on = torch.cat([torch.full((batch,), passes[i][0], device=x.device) for i in mine])
            audio_on = torch.cat(
                [torch.full((batch,), passes[i][1], device=x.device) for i in mine]
            )
            repeats = (count, *([1] * (x.dim() - 1)))
            local = model_fn(x.repeat(repeats), t.repeat(count), text_on, audio_on)
            if self.sequence_parallel is not None:
                shard = self.sequence_parallel.shard_frames(frames, tokens_per_frame=1)
                if local.shape[2] != shard.stop - shard.start:
                    raise RuntimeError(
                        f"the denoiser returned {local.shape[2]} frames under sequence "
                        f"parallelism; SP rank {shard.sp.rank} holds frames "
                        f"{shard.start}:{shard.stop}"
                    )
        velocities = gather_pass_velocities(local, plan, batch, frames, self.sp_size, self.group)
        return combine_passes(velocities, text_scale, audio_scale)


def rank_device(device: str) -> str:
    """A CUDA device without an index becomes this rank's (LOCAL_RANK); others are kept."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextmanager
def cfg_parallel_from_env(device: str, sequence_parallel: int = 1) -> Iterator[CFGParallel | None]:
    """Under torchrun (WORLD_SIZE > 1): the ranks' CFGParallel, on a process group made here
    (nccl for a CUDA ``device``, gloo otherwise) and destroyed on exit unless one already
    existed, with SP groups of ``sequence_parallel`` consecutive ranks. A plain process
    (WORLD_SIZE unset or 1) gets None and no process group. Bad settings are refused before
    any process group is made."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(world_size, sequence_parallel)
    if world_size <= 1:
        yield None
        return
    made = not dist.is_initialized()
    if made:
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(torch.device(rank_device(device)))
        dist.init_process_group("nccl" if on_cuda else "gloo")
    try:
        parallel = CFGParallel(sequence_parallel=sequence_parallel_group(sequence_parallel))
        if parallel.is_main:
            log.info(
                "CFG-parallel sampling on %d ranks in %d slot(s) of %s=%d: each guided step's "
                "passes dealt to the slots as %s",
                parallel.world_size,
                parallel.slots,
                SETTING,
                parallel.sp_size,
                deal_passes(3, parallel.slots),
            )
        yield parallel
    finally:
        if made:
            dist.destroy_process_group()
