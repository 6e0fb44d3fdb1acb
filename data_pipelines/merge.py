"""Merge the partitions of a cluster shard job into one output folder.

    python -m data_pipelines.merge output_dir=DIR [allow_partial=true stale_after_seconds=600]

Each ``python -m data_pipelines.shard ... num_partitions=N partition=P`` job writes
``DIR/parts/part_PPPP-of-NNNN/`` (its own shards, progress, manifest, rejects, stats). The merge
checks that all N partitions finished, hard-links their shards into ``DIR/shards/`` under one
global numbering (partition order, then shard order; a copy where links are impossible) and
writes ``DIR/manifest.jsonl``, ``DIR/rejects.jsonl`` and ``DIR/stats.json`` as a single job
would. Re-running it rewrites nothing that is already right.

Parts that are missing or unfinished (running, stale, stopped, or behind the plan) stop the
merge with their names and the ``sbatch --array=`` list to resubmit; ``allow_partial=true``
merges the finished ones only. Finished parts whose rejects hold failures of the job
(``internal_error``, ``worker_crashed``) are named with the same advice, and merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data_pipelines.part_states import (
    NOT_MERGEABLE,
    PartState,
    array_list,
    inspect_parts,
    partition_layout,
    read_jsonl,
    to_resubmit,
)
from data_pipelines.pipeline import PARTS_DIR, part_dir, write_outputs
from data_pipelines.progress import SHARD_DIR
from data_pipelines.stats import format_summary
from data_pipelines.writer import shard_file_name

log = logging.getLogger(__name__)


@dataclass
class MergeConfig:
    output_dir: str = MISSING
    # Merge the finished partitions while others are missing or unfinished: the combined
    # output then lacks their samples (a later merge of every part replaces it).
    allow_partial: bool = False
    # A running part whose status file has not been updated for this long is "stale".
    stale_after_seconds: float = 600.0


def find_parts(
    output_dir: Path, allow_partial: bool = False, stale_after_seconds: float = 600.0
) -> list[Path]:
    """The finished partition folders in order. Raises ValueError naming the parts that are
    missing or unfinished and what to resubmit (unless ``allow_partial``); warns about
    finished parts with failed sources."""
    total = partition_layout(output_dir)
    if total is None:
        raise ValueError(
            f"output_dir={output_dir} has no {PARTS_DIR}/part_P-of-N folders: run the shard "
            "job with num_partitions=N partition=P (one per P) first"
        )
    states = inspect_parts(output_dir, stale_after_seconds)
    failed = [s for s in states if s.state == "finished" and s.failures]
    if failed:
        log.warning("%s", failure_report(failed, states, total))
    not_ready = [s for s in states if s.state in NOT_MERGEABLE]
    if not_ready and not allow_partial:
        raise ValueError(not_ready_report(not_ready, states, total))
    if not_ready:
        log.warning("allow_partial=true: %s", not_ready_report(not_ready, states, total))
    finished = [part_dir(output_dir, s.partition, total) for s in states if s.state == "finished"]
    if not finished:
        raise ValueError(f"no partition of {output_dir} has finished yet: nothing to merge")
    return finished


def not_ready_report(not_ready: list[PartState], states: list[PartState], total: int) -> str:
    missing = [s.partition for s in not_ready if s.state == "missing"]
    unfinished = [s.partition for s in not_ready if s.state != "missing"]
    lines = [f"not every partition has finished: missing {missing}, unfinished {unfinished}"]
    lines += [f"  {s.name}: {s.state}, {s.detail}" for s in not_ready]
    lines.append(_resubmit_line(states, total))
    if any(s.state == "running" for s in not_ready):
        lines.append("wait for the running parts, then merge again")
    lines.append("(allow_partial=true merges only the finished parts)")
    return "\n".join(line for line in lines if line)


def failure_report(failed: list[PartState], states: list[PartState], total: int) -> str:
    lines = ["partitions with failed sources (internal_error / worker_crashed rejects):"]
    for s in failed:
        shown = ", ".join(s.failed_sources[:5]) + (" ..." if s.failures > 5 else "")
        lines.append(f"  {s.name}: {s.failures} failed: {shown}")
    lines.append(_resubmit_line(states, total) + " to retry them")
    return "\n".join(lines)


def _resubmit_line(states: list[PartState], total: int) -> str:
    partitions = to_resubmit(states)
    if not partitions:
        return ""
    return (
        f"resubmit: NUM_PARTITIONS={total} sbatch --array={array_list(partitions)} "
        "launch/slurm/shard.sbatch (same arguments; finished shards are kept)"
    )


def _link(source: Path, target: Path) -> None:
    if target.exists():
        if os.path.samefile(source, target):
            return
        if (
            target.stat().st_size == source.stat().st_size
            and target.read_bytes() == source.read_bytes()
        ):
            return
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def run_merge(
    output_dir: Path | str, allow_partial: bool = False, stale_after_seconds: float = 600.0
) -> dict:
    """Combine the partitions under output_dir; returns the combined stats."""
    output_dir = Path(output_dir).resolve()
    parts = find_parts(output_dir, allow_partial, stale_after_seconds)
    shard_dir = output_dir / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest, rejects, renamed = [], [], {}
    num_inputs = shard_bytes = 0
    for part in parts:
        stats = json.loads((part / "stats.json").read_text(encoding="utf-8"))
        num_inputs += stats["inputs"]
        for shard in sorted((part / SHARD_DIR).glob("shard-*.tar")):
            name = shard_file_name(len(renamed))
            renamed[(part, f"{SHARD_DIR}/{shard.name}")] = f"{SHARD_DIR}/{name}"
            _link(shard, shard_dir / name)
            shard_bytes += shard.stat().st_size
        for row in read_jsonl(part / "manifest.jsonl"):
            manifest.append({**row, "shard": renamed[(part, row["shard"])]})
        rejects += read_jsonl(part / "rejects.jsonl")
    kept = {Path(name).name for name in renamed.values()}
    for stale in sorted(shard_dir.glob("shard-*.tar")):
        if stale.name not in kept:
            stale.unlink()
    return write_outputs(output_dir, num_inputs, manifest, rejects, len(renamed), shard_bytes)


ConfigStore.instance().store(name="merge_schema", node=MergeConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="merge")
def main(raw: DictConfig) -> None:
    if OmegaConf.is_missing(raw, "output_dir"):
        log.error("output_dir is required: python -m data_pipelines.merge output_dir=DIR")
        sys.exit(2)
    try:
        stats = run_merge(raw.output_dir, raw.allow_partial, raw.stale_after_seconds)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("%s", format_summary(stats))


if __name__ == "__main__":
    main()
