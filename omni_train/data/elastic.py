"""Resume a loader after a change of world size or DataLoader workers.

    states = [json.load(open(p)) for p in sorted(ckpt.glob("loader_rank*.json"))]
    state = elastic_loader_state(states, rank, world_size, cfg.data)
    loader = build_loader(cfg.data, rank, world_size, seed, state)

The new layout first deals out, round robin, every sample that the saved layout's consumers
had not yet taken in their current epochs (read from tar headers only), then starts fresh
epochs; see omni_train.data.plan. This happens per source (a plain data.shards config is one
source), and the samples an old consumer had taken but not yet handed out (waiting in a
bucket) are dealt out with the rest; the new ranks continue the saved rank batch count, so the
weights of the current step (curriculum source_weights) keep applying. Guarantee, tested in
tests/omni_train/data: no sample of the interrupted epoch is skipped and none is read twice
within it (skipped samples: 0; the new consumers' shares of the rest differ by at most one
sample, per source). Corrupt samples are skipped and counted as always; the saved total
carries over on rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omni_train.data.config import DataConfig
from omni_train.data.plan import resolve_split
from omni_train.data.shards import shard_list
from omni_train.data.state import ConsumerPosition, LoaderState

# Fields every rank's saved state must share: they describe the run, not the rank.
_SHARED = ("seed", "world_size", "num_workers", "num_shards", "val_holdout", "batches")


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
        for name in _SHARED:
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
    positions = [position for s in states for position in s.workers]
    old_consumers = old.world_size * len(old.workers)
    handover: dict[str, Any] = {
        "generation": (int(old.handover["generation"]) if old.handover else 0) + 1,
        "world_size": old.world_size,
        "workers": len(old.workers),
    }
    shuffle_buffer = saved_shuffle_buffer or cfg.shuffle_buffer
    _check_continuable(states, positions, cfg)
    sources = [shard_list(source.shards) for source in cfg.source_list()]
    if sum(len(shards) for shards in sources) != old.num_shards:
        raise ValueError(
            f"the loader state was saved with {old.num_shards} shards and this run's data "
            f"holds {sum(len(shards) for shards in sources)}: resume on the same shards"
        )
    previous = old.handover["sources"] if old.handover else [None] * len(sources)
    handover["sources"] = [
        {
            **handover,
            "shuffle_buffer": shuffle_buffer,
            "raw": [p.sources[s] if p.sources else 0 for p in positions],
            "pending": [[i for source, i in p.pending if source == s] for p in positions],
            "previous": previous[s],
            "split": resolve_split(cfg.split, len(shards), old_consumers),
        }
        for s, shards in enumerate(sources)
    ]
    # Worker w hands out rank batches w, w + workers, ...: its first one after the handover
    # is the first such batch at or after the saved count.
    new_positions = [
        ConsumerPosition(batches=(old.batches - w + workers - 1) // workers) for w in range(workers)
    ]
    new = LoaderState(
        seed=old.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        num_shards=old.num_shards,
        # The rank batch count goes on: it is the step the trainer is at (times grad_accum).
        batches=old.batches,
        workers=new_positions,
        handover=handover,
        corrupt_before=sum(s.corrupt_skipped for s in states) if rank == 0 else 0,
        # Kept as saved: build_loader refuses a run with another data.val_holdout.
        val_holdout=old.val_holdout,
        mixed=cfg.mixed,
    )
    return new.to_dict()


def _check_continuable(
    states: Sequence[LoaderState], positions: Sequence[ConsumerPosition], cfg: DataConfig
) -> None:
    """Refuse a saved state this config cannot continue: one read without data.sources and
    data.buckets (or with them, for a config without), or with another number of sources."""
    old = states[0]
    mixed = any(s.mixed for s in states)
    started = any(p.raw for p in positions) or old.handover is not None
    if cfg.mixed and started and not mixed:
        raise ValueError(
            "the loader state is from a run without data.sources and data.buckets and this run "
            "has them: resume with the saved run's data settings, or accept a new data order"
        )
    if mixed and started and not cfg.mixed:
        raise ValueError(
            "the loader state is from a run with data.sources or data.buckets and this run has "
            "neither: resume with the saved run's data settings, or accept a new data order"
        )
    for state in states:
        state.check_sources(len(cfg.source_list()))
