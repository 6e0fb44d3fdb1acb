"""Which raw samples a data consumer reads, in which order: a pure function of the layout.

A consumer (one per rank and DataLoader worker) owns the shards ``shards[c::n]``. Its stream
is epoch after epoch of those shards in a seeded order through a seeded shuffle buffer, so
its position is one number: how many raw samples it has taken. Everything here works from
tar headers only, so fast-forwarding reads no payload.

After a change of world size or worker count (a *handover*) a consumer first reads its share
of the *tail*: the samples that the previous layout's consumers had not yet taken in their
current epochs, dealt out round robin. Then it starts its own epochs (shuffled differently
from the previous layout's, through a generation number). So across a handover no sample of
the interrupted epoch is skipped or read twice, and tail shares differ by at most one
sample between consumers. A handover carries the one before it, so layouts can change again.
Each source of a consumer (omni_train.data.consumer) has a plan and a handover of its own,
and the tail also holds the samples the old consumers had taken but not yet handed out
(waiting in a bucket), ahead of the rest of their epochs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from omni_train.data.shards import SampleRef, held_out, index_shard

# Epoch tag of tail samples (decode randomness is seeded by it); real epochs count from 0.
TAIL_EPOCH = 2**31


def consumer_shards(shards: Sequence[str], consumer: int, num_consumers: int) -> list[str]:
    return list(shards[consumer::num_consumers])


def seed_words(seed: int) -> int:
    # numpy seeds must be non-negative; a negative seed maps to its 64-bit two's complement.
    return seed & 0xFFFF_FFFF_FFFF_FFFF


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


class ShardIndex:
    """Tar-header indexes of shards, built once per shard and shared by every plan.

    ``holdout`` (data.val_holdout) leaves that keyed share of the samples out of every index,
    so no plan built on it (epoch sizes, tails, resumed positions) ever sees them.
    """

    def __init__(self, holdout: float = 0.0) -> None:
        self.holdout = holdout
        self._refs: dict[str, list[SampleRef]] = {}

    def refs(self, shard: str) -> list[SampleRef]:
        if shard not in self._refs:
            self._refs[shard] = [
                ref for ref in index_shard(shard) if not held_out(ref.key, self.holdout)
            ]
        return self._refs[shard]


SPLITS: tuple[str, ...] = ("shard", "sample")


def resolve_split(split: str, num_shards: int, num_consumers: int) -> str:
    """ "auto" splits by shard when every consumer gets one, else by sample."""
    if split == "auto":
        return "shard" if num_shards >= num_consumers else "sample"
    return split


class ConsumerPlan:
    """The raw-sample order of consumer ``consumer`` of ``num_consumers``.

    ``split="shard"``: the consumer owns whole shards (``shards[c::n]``), reads only those.
    ``split="sample"``: every consumer walks the same seeded order of all shards and takes
    every n-th sample, so any number of shards feeds any number of consumers (each consumer
    reads every tar header, but only its own samples' payloads).
    """

    def __init__(
        self,
        shards: Sequence[str],
        seed: int,
        shuffle_buffer: int,
        consumer: int,
        num_consumers: int,
        handover: dict[str, Any] | None = None,
        index: ShardIndex | None = None,
        split: str = "shard",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"data.split={split!r}: use one of {SPLITS} or 'auto'")
        self.split = split
        self.all_shards = list(shards)
        self.seed = seed_words(seed)
        self.shuffle_buffer = shuffle_buffer
        self.consumer = consumer
        self.num_consumers = num_consumers
        self.handover = handover
        self.generation = int(handover["generation"]) if handover else 0
        self.index = index or ShardIndex()
        if split == "shard":
            self.shards = consumer_shards(self.all_shards, consumer, num_consumers)
        else:
            self.shards = list(self.all_shards)
        self._tail: list[SampleRef] | None = None

    @property
    def epoch_size(self) -> int:
        total = sum(len(self.index.refs(shard)) for shard in self.shards)
        if self.split == "shard":
            return total
        return len(range(self.consumer, total, self.num_consumers))

    def _seeds(self, *words: int) -> list[int]:
        # Generation 0 keeps the seeding of layouts that never changed.
        return [self.seed, *words] + ([self.generation] if self.generation else [])

    def epoch_refs(self, epoch: int) -> Iterator[SampleRef]:
        """The raw samples of one of this consumer's own epochs, in shuffled order."""
        buffer_rng = np.random.default_rng(self._seeds(epoch, self.consumer, 1))
        if self.split == "shard":
            order = np.random.default_rng(self._seeds(epoch, self.consumer, 0))
            shard_order = order.permutation(len(self.shards))
            refs = (ref for i in shard_order for ref in self.index.refs(self.shards[i]))
        else:  # one shard order shared by every consumer, dealt out sample by sample
            order = np.random.default_rng(self._seeds(epoch, 0xA11, 0))
            shard_order = order.permutation(len(self.shards))
            every = (ref for i in shard_order for ref in self.index.refs(self.shards[i]))
            refs = itertools.islice(every, self.consumer, None, self.num_consumers)
        return shuffled(refs, self.shuffle_buffer, buffer_rng)

    def decode_seeds(self, epoch: int, key_words: int) -> list[int]:
        return self._seeds(epoch, key_words)

    @property
    def tail(self) -> list[SampleRef]:
        """This consumer's share of what the previous layout left of its epochs."""
        if self._tail is None:
            self._tail = []
            if self.handover:
                old = self.handover
                old_consumers = int(old["world_size"]) * int(old["workers"])
                remaining: list[SampleRef] = []
                pending = old.get("pending") or [[] for _ in old["raw"]]
                for j, raw in enumerate(old["raw"]):
                    plan = ConsumerPlan(
                        self.all_shards,
                        self.seed,
                        int(old.get("shuffle_buffer", self.shuffle_buffer)),
                        j,
                        old_consumers,
                        old.get("previous"),
                        self.index,
                        old.get("split", "shard"),
                    )
                    # Taken but not handed out (waiting in a bucket): not read yet either.
                    remaining += [ref for _, ref in plan.refs_at(pending[j])]
                    remaining += plan.rest_of_epoch(int(raw))
                self._tail = remaining[self.consumer :: self.num_consumers]
        return self._tail

    def refs_at(self, positions: Sequence[int]) -> list[tuple[int, SampleRef]]:
        """(epoch, ref) of the samples at raw ``positions`` (headers only, an epoch replayed
        once however many of its positions are asked for)."""
        tail = self.tail
        epochs: dict[int, list[SampleRef]] = {}
        found = []
        for raw in positions:
            if raw < len(tail):
                found.append((TAIL_EPOCH, tail[raw]))
                continue
            epoch, skip = divmod(raw - len(tail), self.epoch_size)
            if epoch not in epochs:
                epochs[epoch] = list(self.epoch_refs(epoch))
            found.append((epoch, epochs[epoch][skip]))
        return found

    def rest_of_epoch(self, raw: int) -> list[SampleRef]:
        """The samples not yet taken, at position ``raw``, of the epoch (or tail) in progress."""
        tail = self.tail
        if raw < len(tail):
            return tail[raw:]
        epoch, skip = divmod(raw - len(tail), self.epoch_size)
        return list(self.epoch_refs(epoch))[skip:]

    def refs_from(self, raw: int) -> Iterator[tuple[int, SampleRef, bool]]:
        """(epoch, ref, epoch_done_after_it) from position ``raw`` on, forever.

        Whole epochs before ``raw`` are skipped by count; only the partial one replays its
        shuffle (headers only).
        """
        tail = self.tail
        if raw < len(tail):
            rest = tail[raw:]
            for i, ref in enumerate(rest):
                yield TAIL_EPOCH, ref, i == len(rest) - 1
            raw = len(tail)
        epoch, skip = divmod(raw - len(tail), self.epoch_size)
        while True:
            refs = list(self.epoch_refs(epoch))[skip:]
            for i, ref in enumerate(refs):
                yield epoch, ref, i == len(refs) - 1
            epoch, skip = epoch + 1, 0
