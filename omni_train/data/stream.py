"""Deterministic, exactly-resumable streaming of decoded batches from tar shards.

Each data consumer (one per rank and DataLoader worker) reads an infinite stream that is a
pure function of (shards, seed, consumer index, layout), see omni_train.data.plan: epoch by
epoch, its shards (or its every n-th sample, with data.split=sample) in a seeded order,
through a seeded shuffle buffer, then decoded with a generator seeded by (seed, epoch, key).
A consumer's position is therefore one number: how many raw samples it has taken (decoded
plus skipped as corrupt). Resuming replays the shuffle over tar headers only, so no payload
is read and no mp4 is decoded while fast-forwarding. With several sources or buckets the
consumer's batches come from omni_train.data.mix instead, whose position says a little more.

Workers produce whole batches and the DataLoader hands them out in round robin, so batch b of
a rank comes from worker b % num_workers; each batch carries its worker's position, and the
loader's state is the position of every worker after the batches handed out so far.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_train.contracts import key_hash
from omni_train.curriculum.config import CurriculumConfig
from omni_train.data.config import DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.latents import decode_latent_sample
from omni_train.data.mix import MixedBatches, SourceSchedule
from omni_train.data.plan import (
    TAIL_EPOCH,
    ConsumerPlan,
    ShardIndex,
    consumer_shards,
    resolve_split,
)
from omni_train.data.shards import LATENT_MEMBERS, read_sample, shard_list
from omni_train.stop_signals import ignore_stop_signals

log = logging.getLogger(__name__)

TENSORS = ("video", "ref", "latents", "ref_latents", "audio", "audio_features", "keypoints")

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
    # Only with several sources or buckets (omni_train.data.mix): draws made, batches
    # emitted, raw samples taken per source, and taken samples still waiting in a bucket.
    picks: int = 0
    batches: int = 0
    sources: list[int] = field(default_factory=list)
    pending: list[list[int]] = field(default_factory=list)

    @property
    def raw(self) -> int:
        return self.yielded + self.corrupt

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ConsumerPosition:
        return cls(
            yielded=int(state["yielded"]),
            corrupt=int(state["corrupt"]),
            picks=int(state.get("picks", 0)),
            batches=int(state.get("batches", 0)),
            sources=[int(n) for n in state.get("sources", [])],
            pending=[[int(s), int(i)] for s, i in state.get("pending", [])],
        )


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
    # Set when this layout took over from one with another world size or worker count
    # (see omni_train.data.plan); None for a layout that never changed.
    handover: dict[str, Any] | None = None
    # Corrupt samples counted by the layout before a handover (kept on rank 0).
    corrupt_before: int = 0
    # data.val_holdout of the run (None: not recorded, e.g. a state from before the option).
    val_holdout: float | None = None

    @property
    def corrupt_skipped(self) -> int:
        return self.corrupt_before + sum(position.corrupt for position in self.workers)

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
            workers=[ConsumerPosition.from_dict(w) for w in state["workers"]],
            handover=state.get("handover"),
            corrupt_before=int(state.get("corrupt_before", 0)),
            val_holdout=state.get("val_holdout"),
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
        if self.val_holdout is not None and self.val_holdout != expected.val_holdout:
            raise ValueError(
                f"loader state was saved with data.val_holdout={self.val_holdout} and this run "
                f"has {expected.val_holdout}: positions would point at other samples and "
                "held-out samples could be trained on; resume with the same value or start a "
                "new run_dir"
            )
        if len(self.workers) != len(expected.workers):
            raise ValueError(
                f"loader state has {len(self.workers)} worker positions, expected "
                f"{len(expected.workers)}"
            )


# ----------------------------------------------------------------------------- one consumer
class ConsumerStream:
    """The infinite decoded-sample stream of one consumer, starting at ``position``."""

    def __init__(
        self,
        shards: Sequence[str],
        cfg: DataConfig,
        seed: int,
        consumer: int,
        position: ConsumerPosition,
        num_consumers: int | None = None,
        handover: dict[str, Any] | None = None,
    ) -> None:
        # Without num_consumers, ``shards`` are this consumer's own (the original signature).
        if num_consumers is None:
            shards, consumer, num_consumers = list(shards), 0, 1
        self.cfg = cfg
        split = resolve_split(cfg.split, len(shards), num_consumers)
        self.plan = ConsumerPlan(
            shards,
            seed,
            cfg.shuffle_buffer,
            consumer,
            num_consumers,
            handover,
            index=ShardIndex(cfg.val_holdout),
            split=split,
        )
        self.shards = self.plan.shards
        self.position = ConsumerPosition(position.yielded, position.corrupt)

    def __iter__(self) -> Iterator[dict]:
        if self.plan.epoch_size == 0:
            held = f" once data.val_holdout={self.cfg.val_holdout} is left out" * bool(
                self.cfg.val_holdout
            )
            raise ValueError(
                f"shards {self.shards} hold no samples{held}: re-run data_pipelines.shard"
            )
        own = self.position.raw - len(self.plan.tail)
        fresh = own >= 0 and own % self.plan.epoch_size == 0  # at the start of an own epoch
        decoded, last_error = 0, ""
        for epoch, ref, epoch_done in self.plan.refs_from(self.position.raw):
            rng = np.random.default_rng(self.plan.decode_seeds(epoch, key_hash(ref.key)))
            try:
                if self.cfg.precomputed:
                    raw = read_sample(ref, LATENT_MEMBERS)
                    sample = decode_latent_sample(raw, self.cfg, rng)
                else:
                    sample = decode_sample(read_sample(ref), self.cfg, rng)
            except CorruptSample as err:
                self.position.corrupt += 1
                last_error = str(err)
                log.warning("skipping %s (in %s)", err, ref.shard)
                sample = None
            if sample is not None:
                self.position.yielded += 1
                decoded += 1
                yield sample
            if epoch_done:
                if fresh and decoded == 0 and epoch != TAIL_EPOCH:
                    raise RuntimeError(
                        f"no sample of shards {self.shards} decodes (last error: "
                        f"{last_error}); check them with data_pipelines"
                    )
                fresh, decoded = True, 0


# ----------------------------------------------------------------------------- batches
def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors (video/ref, or latents/ref_latents in precomputed mode) into a batch.

    Precomputed text embeddings are padded to the batch's longest caption, with ``text_mask``.
    """
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "quality": [s["quality"] for s in samples],
        "has_audio": torch.tensor([s["has_audio"] for s in samples], dtype=torch.bool),
    }
    for name in TENSORS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if all("text_embeddings" in s for s in samples):
        batch["text_embeddings"], batch["text_mask"] = pad_text(
            [s["text_embeddings"] for s in samples], batch["keys"]
        )
    # A batch where only some samples carry text embeddings (shards encoded with and without
    # them) drops them: the trainer then encodes every caption of that batch itself.
    return batch


def pad_text(embeddings: list[torch.Tensor], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ltok_i, D) per sample -> zero-padded (B, Lt, D) and a bool mask (B, Lt), Lt >= 1.

    The same layout the text encoder returns for a batch of captions (padding to the longest,
    padded positions zero), so the model sees precomputed and on-the-fly text alike.
    """
    dims = {int(e.shape[1]) for e in embeddings}
    if len(dims) != 1:
        raise ValueError(
            f"text_embeddings.npy of samples {keys} have different widths {sorted(dims)}: "
            "the shards were encoded with different text encoders; re-run data_pipelines.encode"
        )
    length = max(1, *(int(e.shape[0]) for e in embeddings))
    text = torch.zeros(len(embeddings), length, dims.pop(), dtype=torch.float32)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)
    for i, tokens in enumerate(embeddings):
        text[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = True
    return text, mask


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
        handover: dict[str, Any] | None = None,
        sources: list[list[str]] | None = None,
        schedule: SourceSchedule | None = None,
    ) -> None:
        self.cfg, self.shards, self.seed = cfg, shards, seed
        self.rank, self.world_size = rank, world_size
        self.positions, self.rotation = positions, rotation
        self.handover = handover
        self.sources, self.schedule = sources, schedule

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = len(self.positions)
        # The DataLoader always starts its round robin at worker 0; rotating makes its first
        # batch come from the worker an uninterrupted run would have asked next.
        worker = ((info.id if info is not None else 0) + self.rotation) % workers
        consumer = self.rank * workers + worker
        if self.cfg.mixed:
            mixed = MixedBatches(
                self.cfg,
                self.sources or [self.shards],
                self.seed,
                consumer,
                self.world_size * workers,
                asdict(self.positions[worker]),
                replace(self.schedule, worker=worker, workers=workers),
                self.handover,
            )
            for batch, position in mixed:
                batch["_worker"] = worker
                batch["_position"] = position
                yield batch
            return
        stream = ConsumerStream(
            self.shards,
            self.cfg,
            self.seed,
            consumer,
            self.positions[worker],
            num_consumers=self.world_size * workers,
            handover=self.handover,
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
        self,
        cfg: DataConfig,
        shards: list[str],
        rank: int,
        world_size: int,
        state: LoaderState,
        sources: list[list[str]] | None = None,
        schedule: SourceSchedule | None = None,
    ) -> None:
        self.cfg = cfg
        self.shards = shards
        self.rank = rank
        self.world_size = world_size
        self.state = state
        self.sources = sources
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

    def _batches(self) -> Iterator[dict]:
        dataset = _RankBatches(
            self.cfg,
            self.shards,
            self.state.seed,
            self.rank,
            self.world_size,
            [ConsumerPosition.from_dict(asdict(p)) for p in self.state.workers],
            self.state.batches % self.num_workers,
            self.state.handover,
            self.sources,
            self.schedule,
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
) -> ResumableLoader:
    """The loader of ``rank`` out of ``world_size``; ``state`` is a saved ``state_dict()``.

    ``curriculum`` and ``grad_accum`` (micro-batches per optimizer step) let the stages'
    source_weights steer a mix of data.sources; without them the sources' own weights hold.
    """
    cfg.validate()
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
    shards = [shard for source_shards in sources for shard in source_shards]
    schedule = None
    if cfg.mixed:
        schedule = SourceSchedule(
            [s.name for s in cfg.source_list()],
            [s.weight for s in cfg.source_list()],
            curriculum,
            grad_accum,
        )
        schedule(0)  # a stage naming an unknown source fails here, not in a worker
    fresh = LoaderState(
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        num_shards=len(shards),
        workers=[ConsumerPosition() for _ in range(workers)],
        val_holdout=cfg.val_holdout,
    )
    if state is not None:
        fresh_workers = fresh.workers
        fresh = LoaderState.from_dict(state)
        fresh.check_matches(
            LoaderState(
                seed,
                rank,
                world_size,
                cfg.num_workers,
                len(shards),
                0,
                fresh_workers,
                val_holdout=cfg.val_holdout,
            )
        )
        fresh.val_holdout = cfg.val_holdout
    return ResumableLoader(cfg, shards, rank, world_size, fresh, sources, schedule)
