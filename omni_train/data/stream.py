"""Exactly-resumable batches for one rank, from DataLoader workers or in-process.

Each data consumer (one per rank and DataLoader worker) reads an infinite stream of batches that
is a pure function of (sources, seed, consumer index, layout), see omni_train.data.consumer, so
its position is a few counts (omni_train.data.state). Resuming replays the shuffles over tar
headers only, so no payload is read and no mp4 is decoded while fast-forwarding.

Workers produce whole batches and the DataLoader hands them out in round robin, so batch b of
a rank comes from worker b % num_workers; each batch comes with its worker's position, and the
loader's state is the position of every worker after the batches handed out so far.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_train.curriculum.config import CurriculumConfig
from omni_train.data.batch import Batch
from omni_train.data.bucket_cost import with_cost_batch_sizes
from omni_train.data.bucket_sync import SyncedConsumerBatches
from omni_train.data.config import DataConfig
from omni_train.data.consumer import ConsumerBatches, SourceSchedule
from omni_train.data.plan import ShardIndex, resolve_split
from omni_train.data.shards import shard_list
from omni_train.data.state import ConsumerPosition, LoaderState
from omni_train.stop_signals import ignore_stop_signals

if TYPE_CHECKING:
    from omni_train.models.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["ResumableLoader", "build_loader", "shard_list"]


class _RankBatches(IterableDataset):
    """Whole batches from one consumer per DataLoader worker (or the only one in-process)."""

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[list[str]],
        seed: int,
        rank: int,
        world_size: int,
        positions: list[ConsumerPosition],
        rotation: int,
        schedule: SourceSchedule,
        handover: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.sources, self.seed = cfg, sources, seed
        self.rank, self.world_size = rank, world_size
        self.positions, self.rotation = positions, rotation
        self.schedule, self.handover = schedule, handover

    def __iter__(self) -> Iterator[tuple[Batch, int, ConsumerPosition]]:
        """(batch, worker, that worker's position after it) forever."""
        info = get_worker_info()
        workers = len(self.positions)
        # The DataLoader always starts its round robin at worker 0; rotating makes its first
        # batch come from the worker an uninterrupted run would have asked next.
        worker = ((info.id if info is not None else 0) + self.rotation) % workers
        args = (
            self.cfg,
            self.sources,
            self.seed,
            self.rank * workers + worker,
            self.world_size * workers,
            self.positions[worker],
            replace(self.schedule, worker=worker, workers=workers),
            self.handover,
        )
        if self.cfg.sync_buckets and len(self.cfg.bucket_list()) > 1:
            batches = SyncedConsumerBatches(*args, worker=worker, workers=workers)
        else:
            batches = ConsumerBatches(*args)
        for batch, position in batches:
            yield batch, worker, position


class ResumableLoader:
    """Infinite batches for one rank; ``state_dict()`` is the position after those yielded.

    Only one iterator may be active: a new ``iter()`` continues from the current position
    and retires the previous iterator.
    """

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[list[str]],
        rank: int,
        world_size: int,
        state: LoaderState,
        schedule: SourceSchedule,
    ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.rank = rank
        self.world_size = world_size
        self.state = state
        self.schedule = schedule
        self._generation = 0

    @property
    def num_workers(self) -> int:
        return len(self.state.workers)

    @property
    def corrupt_skipped(self) -> int:
        return self.state.corrupt_skipped

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def _batches(self) -> Iterator[tuple[Batch, int, ConsumerPosition]]:
        dataset = _RankBatches(
            self.cfg,
            self.sources,
            self.state.seed,
            self.rank,
            self.world_size,
            [position.copy() for position in self.state.workers],
            self.state.batches % self.num_workers,
            self.schedule,
            self.state.handover,
        )
        if self.cfg.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                multiprocessing_context=self.cfg.worker_start_method or None,
                # A step-wide stop signal must not kill the workers under the saving trainer.
                worker_init_fn=ignore_stop_signals,
            )
        )

    def __iter__(self) -> Iterator[Batch]:
        """Batches; after each, ``corrupt_skipped`` and ``state_dict()`` count it in."""
        self._generation += 1
        generation = self._generation
        for batch, worker, position in self._batches():
            if generation != self._generation:
                raise RuntimeError("this loader iterator was replaced by a newer iter(loader)")
            expected = self.state.batches % self.num_workers
            if worker != expected:
                raise RuntimeError(f"batch came from worker {worker}, expected {expected}")
            self.state.workers[worker] = position
            self.state.batches += 1
            yield batch


def _check_source(name: str, shards: list[str], cfg: DataConfig, ranks: int, workers: int):
    consumers = ranks * workers
    split = resolve_split(cfg.split, len(shards), consumers)
    if split == "shard" and len(shards) < consumers:
        raise ValueError(
            f"{name} has {len(shards)} shard(s) for {consumers} data consumers ({ranks} "
            f"rank(s) x {workers} worker(s)) and data.split=shard gives every consumer whole "
            "shards. Set data.split=sample (or auto), write more, smaller shards "
            "(data_pipelines.shard max_samples_per_shard) or lower data.num_workers"
        )
    if split == "sample":
        index = ShardIndex(cfg.val_holdout)
        total = sum(len(index.refs(shard)) for shard in shards)  # few shards: headers only
        if total < consumers:
            raise ValueError(
                f"{name} holds {total} sample(s) for {consumers} data consumers ({ranks} "
                f"rank(s) x {workers} worker(s)): every consumer needs at least one sample. "
                "Lower data.num_workers or add data"
            )


def build_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    seed: int,
    state: dict | None = None,
    curriculum: CurriculumConfig | None = None,
    grad_accum: int = 1,
    model_cfg: ModelConfig | None = None,
) -> ResumableLoader:
    """The loader of ``rank`` out of ``world_size``; ``state`` is a saved ``state_dict()``.

    ``curriculum`` and ``grad_accum`` (micro-batches per optimizer step) let the stages'
    source_weights steer a mix of data.sources; without them the sources' own weights hold.
    ``model_cfg`` counts the buckets' costs for data.batch_by_cost (``loader.cfg`` holds the
    batch sizes it gives).
    """
    cfg.validate()
    cfg = with_cost_batch_sizes(cfg, model_cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} must be at least 1")
    workers = max(1, cfg.num_workers)
    sources = [shard_list(source.shards) for source in cfg.source_list()]
    for source, shards in zip(cfg.source_list(), sources, strict=True):
        label = (
            f"data.shards={source.shards!r}" if not cfg.sources else f"data.sources {source.name!r}"
        )
        _check_source(label, shards, cfg, world_size, workers)
    schedule = SourceSchedule(
        [s.name for s in cfg.source_list()],
        [s.weight for s in cfg.source_list()],
        curriculum,
        grad_accum,
    )
    if cfg.mixed:
        schedule(0)  # a stage naming an unknown source fails here, not in a worker
    start = LoaderState(  # where this layout starts; a saved state must fit it and replaces it
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        num_shards=sum(len(shards) for shards in sources),
        workers=[ConsumerPosition() for _ in range(workers)],
        val_holdout=cfg.val_holdout,
        mixed=cfg.mixed,
    )
    if state is not None:
        saved = LoaderState.from_dict(state)
        saved.check_matches(start, num_sources=len(sources))
        saved.val_holdout, saved.mixed = cfg.val_holdout, cfg.mixed
        start = saved
    return ResumableLoader(cfg, sources, rank, world_size, start, schedule)
