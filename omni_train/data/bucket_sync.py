"""Buckets in step on every rank (data.sync_buckets): rank batch n of every rank comes from
the same (resolution x length) bucket, so all ranks do the same work at every step.

Without it a consumer hands out whichever of its buckets fills first, so at one step one rank
may run a long clip while another runs short ones and waits for it at the all-reduce. Here the
bucket of rank batch n is drawn from a generator seeded by (seed, n) alone, the same on every
rank and worker. The draw follows the data: a *pilot* clip is drawn (source by the weights of
the step, then a shard, then a sample of it; only its json is read) and its bucket is taken
with probability min batch size / that bucket's batch size, else another pilot is drawn. So
bucket i comes up at the rate share_i / batch_size_i at which a consumer's clips fill its
batches, and the clips waiting for their bucket do not pile up in expectation (shards are
drawn uniformly: exact when shards hold equal numbers of clips, as data_pipelines writes them).

A consumer fills the drawn bucket from its own stream: each clip it takes goes to its bucket
(json only), and a bucket's clips are decoded when its batch is formed, so clips waiting for
another bucket hold no decoded frames. The position is that of every consumer stream
(omni_train.data.state): waiting clips are its ``pending`` samples, so resume and a change of
world size stay exact. A consumer whose own clips hold none of the drawn bucket (e.g.
``data.split=shard`` with shards of one aspect ratio each) fails, naming the bucket, once it
has read (batch size + 8) epochs of its sources without filling it; ``data.split=sample`` gives
every consumer the whole mix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from omni_train.data.batch import Batch, collate
from omni_train.data.consumer import ConsumerBatches
from omni_train.data.decode import CorruptSample
from omni_train.data.shards import SampleRef, read_sample
from omni_train.data.state import ConsumerPosition

log = logging.getLogger(__name__)

# Seeds the shared bucket draws apart from every other seeded stream of the loader.
SYNC_STREAM = 0xB0C
# Pilot clips drawn for one rank batch before giving up: no clip of the data fits a bucket.
MAX_PILOTS = 10_000

# A consumer that read (batch size + SPARE_EPOCHS) epochs of its sources without filling the
# drawn bucket holds (almost) none of its clips: an error rather than a hang. A few epochs
# spare, since how many clips of a bucket a consumer gets varies from epoch to epoch.
SPARE_EPOCHS = 8
# A clip waiting for its bucket: ([source, raw index], epoch, ref).
Waiting = tuple[list[int], int, SampleRef]


class SyncedConsumerBatches(ConsumerBatches):
    """A consumer's batch stream whose n-th batch comes from the bucket drawn for rank batch
    ``n * workers + worker`` (worker ``worker`` of a rank's ``workers`` hands out every
    ``workers``-th rank batch)."""

    def __init__(self, *args: Any, worker: int = 0, workers: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker, self.workers = worker, workers

    def rank_batch_bucket(self, rank_batch: int) -> int:
        """The bucket of rank batch ``rank_batch``: the same on every rank and worker."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, rank_batch, SYNC_STREAM])
        smallest = min(bucket.batch_size for bucket in self.buckets)
        weights = None
        if len(self.plans) > 1:
            weights = np.asarray(self.weights_at(self.position.batches), dtype=np.float64)
            if weights.sum() <= 0:
                raise ValueError("every data source has weight 0 at this step: fix source_weights")
            weights = np.cumsum(weights / weights.sum())
        for _ in range(MAX_PILOTS):
            source = 0
            if weights is not None:
                source = int(np.searchsorted(weights, rng.random(), side="right"))
            plan = self.plans[source]
            refs = plan.index.refs(plan.all_shards[int(rng.integers(len(plan.all_shards)))])
            if not refs:
                continue
            ref = refs[int(rng.integers(len(refs)))]
            try:
                bucket = self._bucket_of(ref)
            except CorruptSample:
                continue
            if rng.random() < smallest / self.buckets[bucket].batch_size:
                return bucket
        raise RuntimeError(
            f"data.sync_buckets: {MAX_PILOTS} clips drawn from the data for rank batch "
            f"{rank_batch} and none fits a bucket of data.buckets: check the shards and buckets"
        )

    def _drawn_sources(self) -> list[int]:
        if len(self.plans) == 1:
            return [0]
        weights = self.weights_at(self.position.batches)
        return [s for s, weight in enumerate(weights) if weight > 0]

    def _bucket_of(self, ref: SampleRef) -> int:
        return self._bucket(ref, read_sample(ref, ("json",)))

    def _skip(self, err: CorruptSample, ref: SampleRef, position: ConsumerPosition) -> None:
        position.corrupt += 1
        log.warning("skipping %s (in %s)", err, ref.shard)

    def _not_filled(self, bucket: int, taken: int) -> RuntimeError:
        height, width = self.buckets[bucket].resolution
        return RuntimeError(
            f"data.sync_buckets: data consumer {self.consumer} took {taken} samples, "
            f"{self.buckets[bucket].batch_size + SPARE_EPOCHS} epochs of its sources, without "
            "filling a "
            f"batch of data.buckets.{bucket} ({height}x{width}, "
            f"{self.buckets[bucket].num_frames} frames) with clips that decode: its share of "
            "the shards holds too few of them. Set data.split=sample (every consumer reads the "
            "whole mix) or check the shards"
        )

    def __iter__(self) -> Iterator[tuple[Batch, ConsumerPosition]]:
        """(batch, position after it) forever."""
        self._check_not_empty()
        position = self.position
        waiting: dict[int, list[Waiting]] = {}
        for source, raw_index in list(position.pending):
            [(epoch, ref)] = self.plans[source].refs_at([raw_index])
            try:
                bucket = self._bucket_of(ref)
            except CorruptSample as err:
                self._skip(err, ref, position)
                position.pending.remove([source, raw_index])
                continue
            waiting.setdefault(bucket, []).append(([source, raw_index], epoch, ref))
        streams = [plan.refs_from(position.sources[s]) for s, plan in enumerate(self.plans)]
        epochs = [plan.epoch_size + len(plan.tail) for plan in self.plans]
        while True:
            target = self.rank_batch_bucket(position.batches * self.workers + self.worker)
            size = self.buckets[target].batch_size
            ready: list[tuple[list[int], dict]] = []
            drawn = self._drawn_sources()
            limit = size + SPARE_EPOCHS
            taken = [0] * len(self.plans)
            while len(ready) < size:
                queue = waiting.get(target)
                if queue:
                    ident, epoch, ref = queue.pop(0)
                    try:
                        _, sample = self._decode(ident[0], epoch, ref)
                    except CorruptSample as err:
                        self._skip(err, ref, position)
                        position.pending.remove(ident)
                        continue
                    ready.append((ident, sample))
                    continue
                if all(taken[s] >= limit * epochs[s] for s in drawn):
                    raise self._not_filled(target, sum(taken))
                source = self._pick_source()
                taken[source] += 1
                position.picks += 1
                epoch, ref, _ = next(streams[source])
                raw_index = position.sources[source]
                position.sources[source] += 1
                try:
                    bucket = self._bucket_of(ref)
                except CorruptSample as err:
                    self._skip(err, ref, position)
                    continue
                waiting.setdefault(bucket, []).append(([source, raw_index], epoch, ref))
                position.pending.append([source, raw_index])  # in take order
            done = {tuple(ident) for ident, _ in ready}
            position.pending = [p for p in position.pending if tuple(p) not in done]
            position.yielded += size
            position.batches += 1
            yield collate([sample for _, sample in ready]), position.copy()
