"""Deterministic, exactly-resumable streaming of decoded batches from tar shards.

Each data consumer (one per rank and DataLoader worker) owns a fixed slice of the shards and
reads an infinite stream that is a pure function of (shards, seed, consumer index): epoch by
epoch, its shards in a seeded order, through a seeded shuffle buffer, then decoded with a
generator seeded by (seed, epoch, key). A consumer's position is therefore one number: how
many raw samples it has taken (decoded plus skipped as corrupt). Resuming replays the shuffle
over tar headers only, so no payload is read and no mp4 is decoded while fast-forwarding.

Workers produce whole batches and the DataLoader hands them out in round robin, so batch b of
a rank comes from worker b % num_workers; each batch carries its worker's position, and the
loader's state is the position of every worker after the batches handed out so far.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_train.data.config import DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.shards import SampleRef, index_shard, read_sample, shard_list

log = logging.getLogger(__name__)

STATE_VERSION = 1

__all__ = [
    "ConsumerPosition",
    "LoaderState",
    "ResumableLoader",
    "build_loader",
    "consumer_shards",
    "shard_list",
]


# ----------------------------------------------------------------------------- state
@dataclass
class ConsumerPosition:
    """How far one consumer's stream has gone: samples handed out and samples skipped."""

    yielded: int = 0
    corrupt: int = 0

    @property
    def raw(self) -> int:
        return self.yielded + self.corrupt


@dataclass
class LoaderState:
    """One rank's loader position; ``to_dict`` is what the trainer stores in its checkpoint."""

    seed: int
    rank: int
    world_size: int
    num_workers: int
    num_shards: int
    batches: int = 0
    workers: list[ConsumerPosition] = field(default_factory=list)

    @property
    def corrupt_skipped(self) -> int:
        return sum(position.corrupt for position in self.workers)

    def to_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state.update(version=STATE_VERSION, corrupt_skipped=self.corrupt_skipped)
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderState:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}: "
                "it was written by another omni-train version; start a new run_dir"
            )
        return cls(
            seed=int(state["seed"]),
            rank=int(state["rank"]),
            world_size=int(state["world_size"]),
            num_workers=int(state["num_workers"]),
            num_shards=int(state["num_shards"]),
            batches=int(state["batches"]),
            workers=[
                ConsumerPosition(int(w["yielded"]), int(w["corrupt"])) for w in state["workers"]
            ],
        )

    def check_matches(self, expected: LoaderState) -> None:
        """Raise ValueError naming what differs between a saved state and this run."""
        fixes = {
            "seed": "use the seed of the run being resumed",
            "rank": "each rank must load its own loader state",
            "world_size": "restart with the number of ranks of the run being resumed",
            "num_workers": "set data.num_workers to the value of the run being resumed",
            "num_shards": "resume on the same shards, or start a new run_dir",
        }
        for name, fix in fixes.items():
            saved, current = getattr(self, name), getattr(expected, name)
            if saved != current:
                raise ValueError(
                    f"loader state was saved with {name}={saved} and this run has "
                    f"{name}={current}: {fix}"
                )
        if len(self.workers) != len(expected.workers):
            raise ValueError(
                f"loader state has {len(self.workers)} worker positions, expected "
                f"{len(expected.workers)}"
            )


# ----------------------------------------------------------------------------- one consumer
def consumer_shards(shards: Sequence[str], consumer: int, num_consumers: int) -> list[str]:
    return list(shards[consumer::num_consumers])


def _seed_words(seed: int) -> int:
    # numpy seeds must be non-negative; a negative seed maps to its 64-bit two's complement.
    return seed & 0xFFFF_FFFF_FFFF_FFFF


def _key_words(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")


def shuffled(items: Iterator[SampleRef], buffer_size: int, rng: np.random.Generator):
    """WebDataset-style shuffle buffer: emit a random buffered item once the buffer is full."""
    buffer: list[SampleRef] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    while buffer:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()


class ConsumerStream:
    """The infinite decoded-sample stream of one consumer, starting at ``position``."""

    def __init__(
        self,
        shards: Sequence[str],
        cfg: DataConfig,
        seed: int,
        consumer: int,
        position: ConsumerPosition,
    ) -> None:
        self.shards = list(shards)
        self.cfg = cfg
        self.seed = _seed_words(seed)
        self.consumer = consumer
        self.position = ConsumerPosition(position.yielded, position.corrupt)
        self._index: dict[str, list[SampleRef]] = {}

    def _refs(self, shard: str) -> list[SampleRef]:
        if shard not in self._index:
            self._index[shard] = index_shard(shard)
        return self._index[shard]

    def epoch_refs(self, epoch: int) -> Iterator[SampleRef]:
        """The raw samples of one epoch, in this consumer's shuffled order."""
        order = np.random.default_rng([self.seed, epoch, self.consumer, 0])
        buffer_rng = np.random.default_rng([self.seed, epoch, self.consumer, 1])
        shard_order = order.permutation(len(self.shards))
        refs = (ref for i in shard_order for ref in self._refs(self.shards[i]))
        return shuffled(refs, self.cfg.shuffle_buffer, buffer_rng)

    def __iter__(self) -> Iterator[dict]:
        epoch_size = sum(len(self._refs(shard)) for shard in self.shards)
        if epoch_size == 0:
            raise ValueError(f"shards {self.shards} hold no samples: re-run data_pipelines.shard")
        # Whole epochs are skipped by count; only the partial one replays its shuffle.
        epoch, skip = divmod(self.position.raw, epoch_size)
        while True:
            refs = self.epoch_refs(epoch)
            for _ in range(skip):
                next(refs)
            decoded, last_error = 0, ""
            for ref in refs:
                rng = np.random.default_rng([self.seed, epoch, _key_words(ref.key)])
                try:
                    sample = decode_sample(read_sample(ref), self.cfg, rng)
                except CorruptSample as err:
                    self.position.corrupt += 1
                    last_error = str(err)
                    log.warning("skipping %s (in %s)", err, ref.shard)
                    continue
                self.position.yielded += 1
                decoded += 1
                yield sample
            if skip == 0 and decoded == 0:
                raise RuntimeError(
                    f"no sample of shards {self.shards} decodes (last error: {last_error}); "
                    "check them with data_pipelines"
                )
            epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- batches
def collate(samples: list[dict]) -> dict[str, Any]:
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "ref": torch.stack([s["ref"] for s in samples]),
        "audio": torch.stack([s["audio"] for s in samples]),
        "keypoints": torch.stack([s["keypoints"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "quality": [s["quality"] for s in samples],
        "has_audio": torch.tensor([s["has_audio"] for s in samples], dtype=torch.bool),
    }


class _RankBatches(IterableDataset):
    """Whole batches from one consumer per DataLoader worker (or the only one in-process)."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: list[str],
        seed: int,
        rank: int,
        world_size: int,
        positions: list[ConsumerPosition],
        rotation: int,
    ) -> None:
        self.cfg, self.shards, self.seed = cfg, shards, seed
        self.rank, self.world_size = rank, world_size
        self.positions, self.rotation = positions, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = len(self.positions)
        # The DataLoader always starts its round robin at worker 0; rotating makes its first
        # batch come from the worker an uninterrupted run would have asked next.
        worker = ((info.id if info is not None else 0) + self.rotation) % workers
        consumer = self.rank * workers + worker
        stream = ConsumerStream(
            consumer_shards(self.shards, consumer, self.world_size * workers),
            self.cfg,
            self.seed,
            consumer,
            self.positions[worker],
        )
        samples = []
        for sample in stream:
            samples.append(sample)
            if len(samples) == self.cfg.batch_size:
                batch = collate(samples)
                batch["_worker"] = worker
                batch["_position"] = asdict(stream.position)
                yield batch
                samples = []


class ResumableLoader:
    """Infinite batches for one rank; ``state_dict()`` is the position after those yielded.

    Only one iterator may be active: a new ``iter()`` continues from the current position
    and retires the previous iterator.
    """

    def __init__(
        self, cfg: DataConfig, shards: list[str], rank: int, world_size: int, state: LoaderState
    ) -> None:
        self.cfg = cfg
        self.shards = shards
        self.rank = rank
        self.world_size = world_size
        self.state = state
        self._generation = 0

    @property
    def num_workers(self) -> int:
        return len(self.state.workers)

    @property
    def corrupt_skipped(self) -> int:
        return self.state.corrupt_skipped

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def _batches(self) -> Iterator[dict]:
        dataset = _RankBatches(
            self.cfg,
            self.shards,
            self.state.seed,
            self.rank,
            self.world_size,
            [ConsumerPosition(p.yielded, p.corrupt) for p in self.state.workers],
            self.state.batches % self.num_workers,
        )
        if self.cfg.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                multiprocessing_context=self.cfg.worker_start_method or None,
            )
        )

    def __iter__(self) -> Iterator[dict]:
        self._generation += 1
        generation = self._generation
        for batch in self._batches():
            if generation != self._generation:
                raise RuntimeError("this loader iterator was replaced by a newer iter(loader)")
            worker = batch.pop("_worker")
            position = batch.pop("_position")
            expected = self.state.batches % self.num_workers
            if worker != expected:
                raise RuntimeError(f"batch came from worker {worker}, expected {expected}")
            self.state.workers[worker] = ConsumerPosition(**position)
            self.state.batches += 1
            batch["corrupt_skipped"] = self.state.corrupt_skipped
            yield batch


def build_loader(
    cfg: DataConfig, rank: int, world_size: int, seed: int, state: dict | None = None
) -> ResumableLoader:
    """The loader of ``rank`` out of ``world_size``; ``state`` is a saved ``state_dict()``."""
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    shards = shard_list(cfg.shards)
    workers = max(1, cfg.num_workers)
    consumers = world_size * workers
    if len(shards) < consumers:
        raise ValueError(
            f"data.shards={cfg.shards!r} has {len(shards)} shard(s) for {consumers} data "
            f"consumers ({world_size} rank(s) x {workers} worker(s)); every consumer needs at "
            "least one shard. Write more, smaller shards (data_pipelines.shard "
            "max_samples_per_shard) or lower data.num_workers"
        )
    fresh = LoaderState(
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        num_shards=len(shards),
        workers=[ConsumerPosition() for _ in range(workers)],
    )
    if state is None:
        return ResumableLoader(cfg, shards, rank, world_size, fresh)
    saved = LoaderState.from_dict(state)
    saved.check_matches(fresh)
    return ResumableLoader(cfg, shards, rank, world_size, saved)
