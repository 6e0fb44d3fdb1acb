"""Where a loader is: one position per data consumer, and the state a checkpoint stores.

A consumer's stream (omni_train.data.consumer) is a pure function of the layout, so its
position is a few counts: raw samples taken per source, samples handed out and skipped, source
draws and batches made, and the taken samples still waiting in a half-full bucket.

Version 2 (this one) keeps that position for every config. Version 1 kept only the samples
handed out and skipped when data came from data.shards alone (no data.sources, no
data.buckets), with a handover of that one source at the top; such a state is converted on
load into the position that version 2 would have saved at the same point of the same stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class ConsumerPosition:
    """How far one consumer's stream has gone.

    ``sources[s]``: raw samples taken from source s, decoded or skipped as corrupt (empty
    before the first batch: nothing taken); ``pending``: [source, raw index] of the taken
    samples still waiting in a half-full bucket, in take order; ``picks``: source draws made;
    ``batches``: batches handed out (the weights of the step being filled depend on it).
    """

    yielded: int = 0
    corrupt: int = 0
    picks: int = 0
    batches: int = 0
    sources: list[int] = field(default_factory=list)
    pending: list[list[int]] = field(default_factory=list)

    @property
    def raw(self) -> int:
        """Raw samples taken from every source."""
        return sum(self.sources)

    def copy(self) -> ConsumerPosition:
        return replace(self, sources=list(self.sources), pending=[list(p) for p in self.pending])

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ConsumerPosition:
        return cls(
            yielded=int(state["yielded"]),
            corrupt=int(state["corrupt"]),
            picks=int(state["picks"]),
            batches=int(state["batches"]),
            sources=[int(n) for n in state["sources"]],
            pending=[[int(s), int(i)] for s, i in state["pending"]],
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
    # Set when this layout took over from one with another world size or worker count:
    # {"generation", "world_size", "workers", "sources": [one handover per source]} (see
    # omni_train.data.plan); None for a layout that never changed.
    handover: dict[str, Any] | None = None
    # Corrupt samples counted by the layout before a handover (kept on rank 0).
    corrupt_before: int = 0
    # data.val_holdout of the run (None: not recorded, e.g. a state from before the option).
    val_holdout: float | None = None
    # Whether the run read data.sources and/or data.buckets (DataConfig.mixed).
    mixed: bool = False

    @property
    def corrupt_skipped(self) -> int:
        return self.corrupt_before + sum(position.corrupt for position in self.workers)

    def source_counts(self) -> set[int]:
        """How many sources the saved positions and handover cover (empty: none taken yet)."""
        counts = {len(position.sources) for position in self.workers if position.sources}
        if self.handover:
            counts.add(len(self.handover["sources"]))
        return counts

    def to_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state.update(version=STATE_VERSION, corrupt_skipped=self.corrupt_skipped)
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderState:
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"loader state version {version!r} cannot be read: this omni-train reads "
                f"versions {list(READABLE_VERSIONS)}. Resume it with the omni-train that wrote "
                "it, or start a new run_dir"
            )
        if version == 1:
            state = _from_version_1(state)
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
            mixed=bool(state["mixed"]),
        )

    def check_matches(self, expected: LoaderState, num_sources: int) -> None:
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
        self.check_sources(num_sources)

    def check_sources(self, num_sources: int) -> None:
        counts = self.source_counts()
        if counts and counts != {num_sources}:
            raise ValueError(
                f"the loader state is from a run with {sorted(counts)} data source(s) and this "
                f"run has {num_sources}: resume with the saved run's data.sources"
            )


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A version 1 state in the version 2 layout, at the same point of the same stream."""
    workers, handover = state["workers"], state.get("handover")
    mixed = bool(handover and "sources" in handover) or any(
        w.get("sources") or w.get("pending") or w.get("picks") for w in workers
    )
    if not mixed:  # one source, one bucket: each worker's batches were whole and in turn
        count, total = len(workers), int(state["batches"])
        workers = [
            _plain_position(w, batches=(total - i + count - 1) // count)
            for i, w in enumerate(workers)
        ]
        if handover:
            top = {name: handover[name] for name in ("generation", "world_size", "workers")}
            handover = {**top, "sources": [_source_handover(handover)]}
    return {**state, "version": 2, "workers": workers, "handover": handover, "mixed": mixed}


def _plain_position(position: dict[str, Any], batches: int) -> dict[str, Any]:
    yielded, corrupt = int(position["yielded"]), int(position["corrupt"])
    raw = yielded + corrupt
    return {
        "yielded": yielded,
        "corrupt": corrupt,
        "picks": raw,
        "batches": batches,
        "sources": [raw] if raw else [],
        "pending": [],
    }


def _source_handover(handover: dict[str, Any] | None) -> dict[str, Any] | None:
    """A version 1 handover of the one source, and those before it, as a source's handover:
    nothing waited in a bucket (one bucket, whole batches)."""
    if handover is None:
        return None
    pending = [[] for _ in handover["raw"]]
    return {**handover, "pending": pending, "previous": _source_handover(handover.get("previous"))}
