"""Partition plans: sources assigned to partitions by expected work, not by count.

A source's work is its container duration in seconds (read from the header, nothing decoded);
a source whose duration is unknown (unreadable, or not stated) counts its bytes converted to
seconds at the corpus's mean bytes per second. With no duration known at all the unit is bytes.

The first task of an array to get there writes ``OUT/parts/plan-of-NNNN.json``: every source
placed longest-processing-time first (sources sorted by work descending, then path; each to
the partition with the least work so far, the lowest index on a tie). Sources found later go
into ``plan-of-NNNN.add-GGGG.json`` (generation G = 1, 2, ...), placed the same way on top of
the loads of the plan so far. Each plan file is created exclusively (a complete temp file
hard-linked into place) and never changed, so every task reads the same plan, a source never
changes partition, and a resubmitted task gets the sources it had before.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import av

log = logging.getLogger(__name__)

PLAN_VERSION = 1
UNITS = ("seconds", "bytes")
# A plan file published without hard links may be read while it is being written.
READ_ATTEMPTS, READ_PAUSE_SECONDS = 20, 0.25


def probe_seconds(path: Path) -> float | None:
    """The container's duration in seconds, without decoding; None when unknown."""
    try:
        with av.open(str(path), mode="r") as container:
            if container.duration is not None and container.duration > 0:
                return container.duration / av.time_base
            for stream in container.streams.video:
                if stream.duration and stream.time_base:
                    return float(stream.duration * stream.time_base)
    except Exception:  # noqa: BLE001 - an unreadable input is weighed by its bytes instead
        return None
    return None


@dataclass
class SourceSize:
    seconds: float | None
    bytes: int


def measure_sources(input_dir: Path, sources: list[str]) -> dict[str, SourceSize]:
    sizes = {}
    for source in sources:
        path = input_dir / source
        sizes[source] = SourceSize(probe_seconds(path), path.stat().st_size)
    return sizes


@dataclass
class PartitionPlan:
    num_partitions: int
    unit: str  # "seconds" or "bytes"
    bytes_per_second: float | None  # converts bytes to seconds where a duration is unknown
    input_dir: str = ""  # where the planned sources were found
    assignment: dict[str, int] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)
    generations: int = 1

    def expected_work(self) -> list[float]:
        loads = [0.0] * self.num_partitions
        for source in sorted(self.assignment):
            loads[self.assignment[source]] += self.work[source]
        return loads

    def sources_of(self, partition: int, sources: list[str]) -> list[str]:
        """The ones of ``sources`` (sorted) this plan gives to ``partition``."""
        return [s for s in sources if self.assignment.get(s) == partition]

    def work_of(self, size: SourceSize) -> float:
        if self.unit == "bytes":
            return float(size.bytes)
        if size.seconds is not None:
            return round(size.seconds, 3)
        return round(size.bytes / self.bytes_per_second, 3)


def new_plan(
    sizes: dict[str, SourceSize], num_partitions: int, input_dir: str = ""
) -> PartitionPlan:
    """The generation-0 plan of ``sizes``: the unit from what the probes found, then LPT."""
    timed = [size for size in sizes.values() if size.seconds]
    plan = PartitionPlan(num_partitions, "bytes", None, input_dir)
    if timed:
        rate = sum(size.bytes for size in timed) / sum(size.seconds for size in timed)
        plan = PartitionPlan(num_partitions, "seconds", rate, input_dir)
    place(plan, {source: plan.work_of(size) for source, size in sizes.items()})
    return plan


def place(plan: PartitionPlan, work: dict[str, float]) -> dict[str, int]:
    """Longest processing time first onto the plan's current loads; returns the additions."""
    heap = [(load, partition) for partition, load in enumerate(plan.expected_work())]
    heapq.heapify(heap)
    added = {}
    for source in sorted(work, key=lambda s: (-work[s], s)):
        load, partition = heapq.heappop(heap)
        added[source] = partition
        heapq.heappush(heap, (load + work[source], partition))
    plan.assignment.update(added)
    plan.work.update(work)
    return added


def plan_path(parts_dir: Path, num_partitions: int, generation: int = 0) -> Path:
    stem = f"plan-of-{num_partitions:04d}"
    return parts_dir / (f"{stem}.json" if generation == 0 else f"{stem}.add-{generation:04d}.json")


def plan_for(
    parts_dir: Path, input_dir: Path, sources: list[str], num_partitions: int
) -> PartitionPlan:
    """The plan on disk, created or extended first if ``sources`` holds sources it lacks."""
    plan = read_plan(parts_dir, num_partitions)
    if plan is None:
        log.info("planning %d sources over %d partitions (probing durations)", len(sources),
                 num_partitions)  # fmt: skip
        first = new_plan(measure_sources(input_dir, sources), num_partitions, str(input_dir))
        _publish(plan_path(parts_dir, num_partitions), _payload(first, first.assignment))
        plan = read_plan(parts_dir, num_partitions)
    while new := [s for s in sources if s not in plan.assignment]:
        sizes = measure_sources(input_dir, new)
        added = place(plan, {source: plan.work_of(size) for source, size in sizes.items()})
        log.info("%d sources are new since the plan: added to partitions %s", len(new),
                 sorted(set(added.values())))  # fmt: skip
        _publish(plan_path(parts_dir, num_partitions, plan.generations), _payload(plan, added))
        # Whoever published this generation first wins; read what is on disk.
        plan = read_plan(parts_dir, num_partitions)
    return plan


def read_plan(parts_dir: Path, num_partitions: int) -> PartitionPlan | None:
    """The plan of ``num_partitions`` with every generation applied; None before the first."""
    first = plan_path(parts_dir, num_partitions)
    if not first.is_file():
        return None
    data = _read_json(first)
    _check(first, data, num_partitions)
    plan = PartitionPlan(
        num_partitions, data["unit"], data["bytes_per_second"], data.get("input_dir", "")
    )
    _apply(plan, data)
    while (path := plan_path(parts_dir, num_partitions, plan.generations)).is_file():
        data = _read_json(path)
        _check(path, data, num_partitions)
        _apply(plan, data)
        plan.generations += 1
    return plan


def _apply(plan: PartitionPlan, data: dict) -> None:
    for source, (partition, work) in data["sources"].items():
        plan.assignment[source] = partition
        plan.work[source] = work


def _check(path: Path, data: dict, num_partitions: int) -> None:
    if data.get("version") != PLAN_VERSION or data.get("num_partitions") != num_partitions:
        raise ValueError(
            f"{path} is not a version {PLAN_VERSION} plan of {num_partitions} partitions: "
            "delete it (and the part folders) to plan again, or use a new output_dir"
        )


def _payload(plan: PartitionPlan, added: dict[str, int]) -> bytes:
    data = {
        "version": PLAN_VERSION,
        "num_partitions": plan.num_partitions,
        "unit": plan.unit,
        "bytes_per_second": plan.bytes_per_second,
        "input_dir": plan.input_dir,
        # Expected work per partition with this file applied (in ``unit``).
        "expected_work": [round(load, 3) for load in plan.expected_work()],
        "created": time.time(),
        "created_by": f"{socket.gethostname()}:{os.getpid()}",
        "sources": {source: [added[source], plan.work[source]] for source in sorted(added)},
    }
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _publish(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    try:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.link(tmp, path)  # atomic, and fails if another task got there first
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        return _publish_exclusive(path, data)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_exclusive(path: Path, data: bytes) -> bool:
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return True


def _read_json(path: Path) -> dict:
    for attempt in range(READ_ATTEMPTS):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            if attempt == READ_ATTEMPTS - 1:
                raise ValueError(
                    f"{path} is not valid json: delete it (and the part folders) to plan again"
                ) from None
            time.sleep(READ_PAUSE_SECONDS)
    raise AssertionError("unreachable")


PLAN_NAME = re.compile(r"plan-of-(\d{4,})\.json")


def planned_partitions(parts_dir: Path) -> set[int]:
    """The partition counts that have a plan under ``parts_dir``."""
    return {
        int(match[1])
        for path in parts_dir.glob("plan-of-*.json")
        if (match := PLAN_NAME.fullmatch(path.name))
    }
