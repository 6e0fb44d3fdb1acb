"""One data consumer's infinite batch stream, for every data config.

A consumer (one rank's DataLoader worker, or the rank itself without workers) reads each of
its sources through that source's plan (omni_train.data.plan): epoch after epoch, in a seeded
order, through a seeded shuffle buffer. Each raw sample is taken from a source drawn by weight
(a seeded draw per pick, with the weights of the step the consumer is filling), decoded with a
generator seeded by (seed, epoch, key) and put in its (resolution x length) bucket; a bucket
that reaches its batch size becomes a batch. A plain config (data.shards, no data.sources or
data.buckets) is the case of one source, nothing to draw, and the one bucket of
data.resolution / data.num_frames / data.batch_size.

The position (omni_train.data.state.ConsumerPosition) is: picks so far, raw samples taken per
source, samples handed out and skipped, and the pending samples (taken, decoded, waiting in a
bucket) as (source, raw index) pairs. Resuming replays the shuffles over tar headers only,
re-decodes the pending samples (a few batches at most) and continues, so the stream is exactly
that of an uninterrupted run.

After a change of world size or worker count, ``handover["sources"]`` holds one handover per
source (see omni_train.data.elastic): each source's plan first deals out what the old
consumers had left of that source, pending samples included, so every source's and bucket's
rest of the interrupted epoch is read once, still drawn by the weights of the current step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from omni_train.contracts import SHARD_MEMBERS, key_hash
from omni_train.curriculum.config import CurriculumConfig
from omni_train.curriculum.schedule import source_weights_at
from omni_train.data.batch import Batch, collate
from omni_train.data.config import BucketConfig, DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.latents import decode_latent_sample
from omni_train.data.plan import ConsumerPlan, ShardIndex, resolve_split
from omni_train.data.shards import LATENT_MEMBERS, SampleRef, read_sample
from omni_train.data.state import ConsumerPosition

log = logging.getLogger(__name__)

# Weights of the step filling a consumer's batch ``index`` -> one weight per source.
WeightsAt = Callable[[int], Sequence[float]]


@dataclass
class SourceSchedule:
    """Picklable weights_at for one worker: consumer batch index -> weight per source."""

    names: list[str]
    defaults: list[float]
    curriculum: CurriculumConfig | None = None
    grad_accum: int = 1
    worker: int = 0
    workers: int = 1

    def __call__(self, batch_index: int) -> list[float]:
        if self.curriculum is None:
            return list(self.defaults)
        # The DataLoader deals batches to workers in turn: rank batch = b * workers + worker.
        step = (batch_index * self.workers + self.worker) // self.grad_accum
        weights = source_weights_at(
            self.curriculum, step, dict(zip(self.names, self.defaults, strict=True))
        )
        return [weights[name] for name in self.names]


def source_seed(seed: int, source: int) -> int:
    return seed if source == 0 else seed + 1_000_003 * source


def choose_bucket(meta: dict[str, Any], buckets: Sequence[BucketConfig], fps: float) -> int | None:
    """The bucket nearest the clip's aspect ratio among those whose window fits in it."""
    frames, clip_fps = int(meta["num_frames"]), float(meta["fps"])
    fits = [
        i for i, b in enumerate(buckets) if round((b.num_frames - 1) * clip_fps / fps) <= frames - 1
    ]
    if not fits:
        return None
    width, height = meta.get("width"), meta.get("height")
    if not width or not height:
        return max(fits, key=lambda i: buckets[i].num_frames)
    aspect = math.log(float(width) / float(height))

    def distance(i: int) -> tuple[float, int]:
        h, w = buckets[i].resolution
        return abs(math.log(w / h) - aspect), -buckets[i].num_frames

    return min(fits, key=distance)


class ConsumerBatches:
    """The infinite batch stream of consumer ``consumer`` of ``num_consumers`` over
    ``sources`` (one shard list per source), from ``position`` on."""

    def __init__(
        self,
        cfg: DataConfig,
        sources: Sequence[Sequence[str]],
        seed: int,
        consumer: int,
        num_consumers: int,
        position: ConsumerPosition,
        weights_at: WeightsAt,
        handover: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.buckets = cfg.bucket_list()
        # The window settings of each bucket (a plain config's one bucket: its own).
        self.bucket_cfgs = [
            replace(
                cfg, resolution=list(b.resolution), num_frames=b.num_frames, batch_size=b.batch_size
            )
            for b in self.buckets
        ]
        self.seed, self.consumer = seed, consumer
        handovers = handover["sources"] if handover else [None] * len(sources)
        if len(handovers) != len(sources):
            raise ValueError(
                f"the loader state's handover covers {len(handovers)} data source(s) and this "
                f"run has {len(sources)}: resume with the data.sources of the saved run"
            )
        index = ShardIndex(cfg.val_holdout)  # shared by the sources' plans
        self.plans = [
            ConsumerPlan(
                shards,
                source_seed(seed, s),
                cfg.shuffle_buffer,
                consumer,
                num_consumers,
                handovers[s],
                index=index,
                split=resolve_split(cfg.split, len(shards), num_consumers),
            )
            for s, shards in enumerate(sources)
        ]
        self.weights_at = weights_at
        self.position = position.copy()
        self.position.sources = self.position.sources or [0] * len(sources)

    def _pick_source(self) -> int:
        if len(self.plans) == 1:
            return 0
        weights = np.asarray(self.weights_at(self.position.batches), dtype=np.float64)
        if weights.sum() <= 0:
            raise ValueError("every data source has weight 0 at this step: fix source_weights")
        draw = np.random.default_rng(
            [self.seed & 0xFFFFFFFF, self.consumer, self.position.picks, 7]
        ).random()
        return int(np.searchsorted(np.cumsum(weights / weights.sum()), draw, side="right"))

    def _bucket(self, ref: SampleRef, raw: dict[str, Any]) -> int:
        # Without data.sources and data.buckets every clip goes to the one bucket and the
        # decoder alone checks that the window fits (a precomputed window is taken as stored).
        if not self.cfg.mixed:
            return 0
        try:
            meta = json.loads(bytes(raw.get("json", b"")).decode("utf-8"))
            bucket = choose_bucket(meta, self.buckets, self.cfg.fps)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CorruptSample(ref.key, f"json member does not parse: {err}") from err
        if bucket is None:
            raise CorruptSample(ref.key, "clip is shorter than the window of every bucket")
        return bucket

    def _decode(self, source: int, epoch: int, ref: SampleRef) -> tuple[int, dict]:
        raw = read_sample(ref, LATENT_MEMBERS if self.cfg.precomputed else SHARD_MEMBERS)
        bucket = self._bucket(ref, raw)
        rng = np.random.default_rng(self.plans[source].decode_seeds(epoch, key_hash(ref.key)))
        decode = decode_latent_sample if self.cfg.precomputed else decode_sample
        return bucket, decode(raw, self.bucket_cfgs[bucket], rng)

    def _check_not_empty(self) -> None:
        for plan in self.plans:
            if plan.epoch_size == 0:
                held = f" once data.val_holdout={self.cfg.val_holdout} is left out" * bool(
                    self.cfg.val_holdout
                )
                raise ValueError(
                    f"shards {plan.shards} hold no samples{held}: re-run data_pipelines.shard"
                )

    def _nothing_decodes(self, err: CorruptSample) -> RuntimeError:
        if len(self.plans) == 1:
            where = f"shards {self.plans[0].shards}"
        else:
            where = f"data sources {[plan.all_shards for plan in self.plans]}"
        buckets = " for these buckets" * bool(self.cfg.buckets)
        fix = "data_pipelines and data.buckets" if self.cfg.buckets else "data_pipelines"
        return RuntimeError(
            f"no sample of {where} decodes{buckets} (last error: {err}); check the shards "
            f"with {fix}"
        )

    def __iter__(self) -> Iterator[tuple[Batch, ConsumerPosition]]:
        """(batch, position after it) forever."""
        self._check_not_empty()
        position = self.position
        filling: dict[int, list[tuple[list[int], dict]]] = {}
        for source, raw_index in position.pending:
            [(epoch, ref)] = self.plans[source].refs_at([raw_index])
            bucket, sample = self._decode(source, epoch, ref)
            filling.setdefault(bucket, []).append(([source, raw_index], sample))
        streams = [plan.refs_from(position.sources[s]) for s, plan in enumerate(self.plans)]
        # More failures in a row than a whole epoch (and tail) of every source: nothing decodes.
        epoch_samples = sum(plan.epoch_size + len(plan.tail) for plan in self.plans)
        failed_in_a_row = 0
        while True:
            source = self._pick_source()
            position.picks += 1
            epoch, ref, _ = next(streams[source])
            raw_index = position.sources[source]
            position.sources[source] += 1
            try:
                bucket, sample = self._decode(source, epoch, ref)
            except CorruptSample as err:
                position.corrupt += 1
                log.warning("skipping %s (in %s)", err, ref.shard)
                failed_in_a_row += 1
                if failed_in_a_row > epoch_samples:
                    raise self._nothing_decodes(err) from err
                continue
            failed_in_a_row = 0
            filling.setdefault(bucket, []).append(([source, raw_index], sample))
            position.pending.append([source, raw_index])  # in take order
            if len(filling[bucket]) < self.buckets[bucket].batch_size:
                continue
            items = filling.pop(bucket)
            done = {tuple(ident) for ident, _ in items}
            position.pending = [p for p in position.pending if tuple(p) not in done]
            batch = collate([sample for _, sample in items])
            position.yielded += len(items)
            position.batches += 1
            yield batch, position.copy()
