"""Merge the partitions of a cluster shard job into one output folder.

    python -m data_pipelines.merge output_dir=DIR

Each ``python -m data_pipelines.shard ... num_partitions=N partition=P`` job writes
``DIR/parts/part_PPPP-of-NNNN/`` (its own shards, progress, manifest, rejects, stats). The merge
checks that all N partitions finished, hard-links their shards into ``DIR/shards/`` under one
global numbering (partition order, then shard order; a copy where links are impossible) and
writes ``DIR/manifest.jsonl``, ``DIR/rejects.jsonl`` and ``DIR/stats.json`` as a single job
would. Re-running it rewrites nothing that is already right.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data_pipelines.pipeline import PARTS_DIR, write_outputs
from data_pipelines.progress import SHARD_DIR
from data_pipelines.stats import format_summary
from data_pipelines.writer import shard_file_name

log = logging.getLogger(__name__)

PART_NAME = re.compile(r"part_(\d{4,})-of-(\d{4,})")


@dataclass
class MergeConfig:
    output_dir: str = MISSING


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def find_parts(output_dir: Path) -> list[Path]:
    """The finished partition folders in order; raises ValueError naming what is missing."""
    found: dict[int, Path] = {}
    totals = set()
    for path in sorted((output_dir / PARTS_DIR).glob("part_*")):
        match = PART_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
            totals.add(int(match[2]))
    if not found:
        raise ValueError(
            f"output_dir={output_dir} has no {PARTS_DIR}/part_P-of-N folders: run the shard "
            "job with num_partitions=N partition=P (one per P) first"
        )
    if len(totals) != 1:
        raise ValueError(
            f"{output_dir / PARTS_DIR} mixes partitionings (of {sorted(totals)}): keep one "
            "num_partitions per output_dir"
        )
    (total,) = totals
    missing = [p for p in range(total) if p not in found]
    unfinished = [p for p, path in found.items() if not (path / "stats.json").is_file()]
    if missing or unfinished:
        raise ValueError(
            f"not every partition has finished: missing {missing}, unfinished {unfinished}: "
            f"re-run those with num_partitions={total} partition=P (finished work is kept)"
        )
    return [found[p] for p in range(total)]


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


def run_merge(output_dir: Path | str) -> dict:
    """Combine the partitions under output_dir; returns the combined stats."""
    output_dir = Path(output_dir).resolve()
    parts = find_parts(output_dir)
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
        stats = run_merge(raw.output_dir)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("%s", format_summary(stats))


if __name__ == "__main__":
    main()
