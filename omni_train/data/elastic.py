"""Resume a loader after a change of world size or DataLoader workers.

    states = [json.load(open(p)) for p in sorted(ckpt.glob("loader_rank*.json"))]
    state = elastic_loader_state(states, rank, world_size, cfg.data)
    loader = build_loader(cfg.data, rank, world_size, seed, state)

The new layout first deals out, round robin, every sample that the saved layout's consumers
had not yet taken in their current epochs (read from tar headers only), then starts fresh
epochs; see omni_train.data.plan. Guarantee, tested in tests/omni_train/data: no sample of
the interrupted epoch is skipped and none is read twice within it (skipped samples: 0;
the new consumers' shares of the rest differ by at most one sample). Corrupt samples are
skipped and counted as always; the saved total carries over on rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omni_train.data.config import DataConfig
from omni_train.data.plan import resolve_split
from omni_train.data.stream import ConsumerPosition, LoaderState


def elastic_loader_state(
    saved: Sequence[dict[str, Any]],
    rank: int,
    world_size: int,
    cfg: DataConfig,
    saved_shuffle_buffer: int | None = None,
) -> dict[str, Any]:
    """The loader state of ``rank`` of ``world_size`` continuing every rank's ``saved`` state.

    ``saved`` holds one ``state_dict()`` per rank of the interrupted run (any order).
    ``saved_shuffle_buffer``: that run's data.shuffle_buffer when it differs from ``cfg``'s.
    With an unchanged layout the saved state of ``rank`` is returned as it is.
    """
    states = sorted((LoaderState.from_dict(s) for s in saved), key=lambda s: s.rank)
    if not states:
        raise ValueError("no saved loader state given: pass every loader_rank*.json")
    old = states[0]
    if [s.rank for s in states] != list(range(old.world_size)):
        raise ValueError(
            f"loader states of ranks {[s.rank for s in states]} given for a run of "
            f"{old.world_size} ranks: pass every loader_rank*.json of the checkpoint"
        )
    for s in states:
        for name in ("seed", "world_size", "num_workers", "num_shards", "val_holdout"):
            if getattr(s, name) != getattr(old, name):
                raise ValueError(
                    f"loader states disagree on {name} ({getattr(s, name)} vs "
                    f"{getattr(old, name)}): they are not from one checkpoint"
                )
        if s.handover != old.handover:
            raise ValueError("loader states disagree on their handover: not from one checkpoint")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    workers = max(1, cfg.num_workers)
    if world_size == old.world_size and cfg.num_workers == old.num_workers:
        return states[rank].to_dict()
    if cfg.mixed or any(p.sources or p.pending for s in states for p in s.workers):
        raise ValueError(
            f"the loader state is from a run with data.sources or data.buckets, whose position "
            f"cannot move to another layout yet: resume with {old.world_size} rank(s) and "
            f"data.num_workers={old.num_workers}"
        )
    handover = {
        "generation": (int(old.handover["generation"]) if old.handover else 0) + 1,
        "world_size": old.world_size,
        "workers": len(old.workers),
        "shuffle_buffer": saved_shuffle_buffer or cfg.shuffle_buffer,
        "raw": [position.raw for s in states for position in s.workers],
        "previous": old.handover,
        "split": resolve_split(cfg.split, old.num_shards, old.world_size * len(old.workers)),
    }
    new = LoaderState(
        seed=old.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        num_shards=old.num_shards,
        workers=[ConsumerPosition() for _ in range(workers)],
        handover=handover,
        corrupt_before=sum(s.corrupt_skipped for s in states) if rank == 0 else 0,
        # Kept as saved: build_loader refuses a run with another data.val_holdout.
        val_holdout=old.val_holdout,
    )
    return new.to_dict()
