"""Sequence-parallel (SP) sampling: each denoiser call's latent frames split over N ranks.

``torchrun --nproc_per_node W -m omni_train.sample ... sequence_parallel=N`` makes W / N CFG
slots of N consecutive ranks (rank g: slot g // N, SP rank g % N). Each guided step's passes
are dealt to the slots as CFG-parallel deals them to ranks (cfg_parallel.deal_passes). The N
ranks of a slot run the denoiser on the same full inputs, each with its SequenceParallel, and
get the velocity of their own frames (SequenceParallel.shard_frames: the first frames mod N
ranks hold one frame more). One all-gather over every rank, of each rank's velocities padded
to the widest share of passes and the largest frame count, then gives every rank every pass's
whole velocity, so all ranks take the same Euler step.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist

from omni_train.models.sequence_parallel import (
    SequenceParallel,
    check_heads,
    sequence_parallel_groups,
)

SETTING = "sequence_parallel"


def check_layout(world_size: int, size: int) -> None:
    """``size`` ranks per SP group must be >= 1 and divide the launch's ranks."""
    if size < 1:
        raise ValueError(f"{SETTING}={size} must be >= 1 (1 = no sequence parallelism)")
    if world_size % size:
        raise ValueError(
            f"{SETTING}={size} must divide the ranks of the launch (WORLD_SIZE={world_size}): "
            f"launch torchrun with --nproc_per_node a multiple of {size} (CFG slots x "
            f"{SETTING})"
        )


def frame_counts(frames: int, size: int) -> list[int]:
    """Latent frames each SP rank holds, in rank order (the denoisers' own split)."""
    starts = SequenceParallel(None, 0, size).shard_frames(frames, tokens_per_frame=1).frame_starts
    return [stop - start for start, stop in pairwise(starts)]


def check_model(denoiser: torch.nn.Module, size: int, latent_frames: int, segment: int) -> None:
    """Refuse, before any sampling, an SP size the heads or a segment's frames cannot take."""
    if size <= 1:
        return
    if latent_frames < size:
        raise ValueError(
            f"{SETTING}={size} is more than the {latent_frames} latent frames of a "
            f"{segment}-frame segment: every sequence-parallel rank needs at least one whole "
            f"frame; use longer segments or a smaller {SETTING}"
        )
    try:
        # Every denoiser family names its heads and the setting that sets them.
        check_heads(denoiser.num_heads, size, denoiser.heads_setting)
    except ValueError as err:  # its message names the training setting
        raise ValueError(str(err).replace("trainer.sequence_parallel", SETTING)) from None


def sequence_parallel_group(size: int) -> SequenceParallel | None:
    """This rank's SP group of ``size`` consecutive ranks (None for size 1). Collective: every
    rank calls it. A group spanning the whole launch is the default group."""
    check_layout(dist.get_world_size(), size)
    if size == 1:
        return None
    if size == dist.get_world_size():
        return SequenceParallel.of_group(None)
    return sequence_parallel_groups(size)


def gather_pass_velocities(
    local: torch.Tensor,
    plan: list[list[int]],
    batch: int,
    frames: int,
    size: int,
    group: Any = None,
) -> list[torch.Tensor]:
    """Every pass's whole velocity (B, C, frames, h, w), in pass order, on every rank.

    ``local``: this rank's velocities of its slot's passes (``plan[rank // size]``, batch
    ``batch`` each, stacked), of its own frames only; empty along dim 0 when its slot has no
    pass this step. ``group``: all the ranks sampling together (W = len(plan) x size).
    """
    counts = frame_counts(frames, size)
    widest = max(len(share) for share in plan)
    padded = local.new_zeros((widest * batch, local.shape[1], max(counts), *local.shape[3:]))
    padded[: local.shape[0], :, : local.shape[2]] = local
    gathered = [torch.empty_like(padded) for _ in range(len(plan) * size)]
    dist.all_gather(gathered, padded, group=group)
    velocities = []
    for slot, share in enumerate(plan):
        ranks = gathered[slot * size : (slot + 1) * size]
        for j in range(len(share)):
            rows = slice(j * batch, (j + 1) * batch)
            pieces = [part[rows, :, :count] for part, count in zip(ranks, counts, strict=True)]
            velocities.append(torch.cat(pieces, dim=2))
    return velocities
