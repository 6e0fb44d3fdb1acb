"""What state each part of a shard job is in (finished, running, stale, stopped, behind,
unfinished, missing), read from its files: the status CLI shows it, merge acts on it. See
data_pipelines/status.py for what each state means.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.pipeline import PARTS_DIR, part_dir
from data_pipelines.progress import FAILURE_REASONS, read_status
from data_pipelines.workload import PLAN_NAME, PartitionPlan, read_plan

SINGLE_RUN = "."
PART_NAME = re.compile(r"part_(\d{4,})-of-(\d{4,})")
# States that leave a part out of a merge, and those a resubmission can fix.
NOT_MERGEABLE = ("running", "stale", "stopped", "behind", "unfinished", "missing")
RESUBMIT = ("stale", "stopped", "behind", "unfinished", "missing")


@dataclass
class PartState:
    name: str  # part_PPPP-of-NNNN, or "." for a single run
    partition: int | None
    state: str
    total: int | None = None  # sources of the part; None when not known yet
    done: int = 0
    clips: int = 0
    clips_per_second: float | None = None
    eta_seconds: float | None = None
    failed_sources: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def failures(self) -> int:
        return len(self.failed_sources)


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def partition_layout(output_dir: Path) -> int | None:
    """The partition count of output_dir (from its part folders and plans); None for a
    single run. Raises ValueError when partitionings are mixed."""
    parts = output_dir / PARTS_DIR
    totals = {int(name.rsplit("-of-", 1)[1]) for name in _part_names(parts)}
    totals |= {
        int(m[1]) for p in parts.glob("plan-of-*.json") if (m := PLAN_NAME.fullmatch(p.name))
    }
    if len(totals) > 1:
        raise ValueError(
            f"{parts} mixes partitionings (of {sorted(totals)}): keep one num_partitions per "
            "output_dir"
        )
    return next(iter(totals), None)


def _part_names(parts: Path) -> list[str]:
    return sorted(
        p.name for p in parts.glob("part_*") if p.is_dir() and PART_NAME.fullmatch(p.name)
    )


def inspect_parts(output_dir: Path, stale_after_seconds: float = 600.0) -> list[PartState]:
    """Every partition's state in order (or the single run's); [] when nothing ran yet."""
    output_dir = Path(output_dir)
    total = partition_layout(output_dir)
    now = time.time()
    if total is None:
        has_run = (output_dir / "stats.json").is_file() or read_status(output_dir) is not None
        return (
            [inspect_run(output_dir, SINGLE_RUN, None, now, stale_after_seconds)] if has_run else []
        )
    plan = read_plan(output_dir / PARTS_DIR, total)
    states = []
    for partition in range(total):
        folder = part_dir(output_dir, partition, total)
        state = inspect_run(folder, folder.name, partition, now, stale_after_seconds)
        if plan is not None and state.total is None:
            state.total = sum(p == partition for p in plan.assignment.values())
        if plan is not None and plan.generations > 1 and state.state == "finished":
            _check_behind(state, folder, plan.sources_of(partition, sorted(plan.assignment)), plan)
        states.append(state)
    return states


def inspect_run(
    run_dir: Path, name: str, partition: int | None, now: float, stale_after_seconds: float
) -> PartState:
    """One run folder's state, from its live status file or else its stats.json."""
    status = read_status(run_dir)
    if status is not None:
        age = now - status.updated
        state = "running" if status.state == "running" else "stopped"
        if state == "running" and age > stale_after_seconds:
            state = "stale"
        detail = f"{status.host}:{status.pid}, updated {format_seconds(age)} ago"
        if state == "stopped":
            detail += f" ({status.state})"
        return PartState(
            name, partition, state, status.sources_total, status.sources_done, status.clips,
            status.clips_per_second, status.eta_seconds if state == "running" else None,
            list(status.failed_sources), detail,
        )  # fmt: skip
    if (run_dir / "stats.json").is_file():
        stats = json.loads((run_dir / "stats.json").read_text(encoding="utf-8"))
        failed = sorted(
            row["source"]
            for row in read_jsonl(run_dir / "rejects.jsonl")
            if row["reason"] in FAILURE_REASONS
        )
        return PartState(
            name, partition, "finished", stats["inputs"], stats["inputs"], stats["sharded"],
            failed_sources=failed,
        )  # fmt: skip
    if run_dir.is_dir():
        return PartState(name, partition, "unfinished", detail="no status or stats yet")
    return PartState(name, partition, "missing", detail="not started")


def _check_behind(state: PartState, folder: Path, planned: list[str], plan: PartitionPlan) -> None:
    """A finished part lacks sources the plan gave it later (files added since it ran)."""
    seen = {row["source"] for row in read_jsonl(folder / "manifest.jsonl")}
    seen |= {row["source"] for row in read_jsonl(folder / "rejects.jsonl")}
    input_dir = Path(plan.input_dir) if plan.input_dir else None
    new = [s for s in planned if s not in seen and (input_dir is None or (input_dir / s).exists())]
    if new:
        state.state = "behind"
        state.total = state.done + len(new)
        state.detail = f"{len(new)} sources added to the plan since it finished"


def array_list(partitions: list[int]) -> str:
    """slurm's --array syntax: [0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def to_resubmit(states: list[PartState]) -> list[int]:
    """Partitions a resubmission would complete or retry (not the running ones)."""
    return [
        s.partition
        for s in states
        if s.partition is not None
        and (s.state in RESUBMIT or (s.state == "finished" and s.failures))
    ]


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
