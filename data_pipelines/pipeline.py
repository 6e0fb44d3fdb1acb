"""The shard job: scan inputs, shard what is not done yet, write manifest / rejects / stats.

Resuming: sources already in a finished shard (one with a valid progress record) are
skipped. The rest fall into runs of consecutive inputs (in sorted order) between finished
shards; each run is packed greedily from a fresh shard, and new shards take the lowest free
indices. Since finished shards begin and end on the boundaries the uninterrupted job would
have used, a resumed job writes the same shards, byte for byte, and never doubles a sample.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data_pipelines.config import ShardConfig, output_fingerprint
from data_pipelines.progress import SHARD_DIR, ShardRecord, load_records, save_record
from data_pipelines.samples import SourceResult, process_source
from data_pipelines.stats import build_stats
from data_pipelines.tags import CONDITIONS
from data_pipelines.writer import TarShard, shard_file_name, write_if_changed

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})
MISSING_VALUES = ("", "???")


def check_dirs(cfg: ShardConfig) -> tuple[Path, Path]:
    """Resolved (input_dir, output_dir); raises ValueError naming the key and the fix."""
    for key, what in (
        ("input_dir", "the folder of videos to shard"),
        ("output_dir", "where shards, manifest, rejects and stats go"),
    ):
        if str(getattr(cfg, key)) in MISSING_VALUES:
            raise ValueError(f"{key} is required: pass {key}=DIR ({what})")
    input_dir, output_dir = Path(cfg.input_dir).resolve(), Path(cfg.output_dir).resolve()
    if not input_dir.is_dir():
        raise ValueError(
            f"input_dir={cfg.input_dir} is not an existing folder: pass "
            "input_dir=DIR pointing at the videos to shard"
        )
    if output_dir == input_dir:
        raise ValueError(
            f"output_dir={cfg.output_dir} is the input folder: pass a separate output_dir=DIR"
        )
    for key in ("fps", "clip_seconds", "min_clip_seconds"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key}={getattr(cfg, key)} must be positive")
    if cfg.min_clip_seconds > cfg.clip_seconds:
        raise ValueError(
            f"min_clip_seconds={cfg.min_clip_seconds} exceeds "
            f"clip_seconds={cfg.clip_seconds}: lower min_clip_seconds"
        )
    return input_dir, output_dir


def scan_inputs(input_dir: Path, exclude: Path | None = None) -> list[str]:
    """Video files under input_dir (any depth, suffix case-insensitive), as sorted posix
    paths relative to input_dir; files under ``exclude`` are skipped."""
    found = []
    for path in input_dir.rglob("*"):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not (path.is_file() or path.is_symlink()):
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        found.append(path.relative_to(input_dir).as_posix())
    return sorted(found)


def pending_runs(sources: list[str], done: set[str]) -> list[list[str]]:
    """Maximal runs of consecutive sources that no finished shard holds."""
    runs: list[list[str]] = [[]]
    for source in sources:
        if source in done:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(source)
    return [run for run in runs if run]


class ShardPacker:
    """Fills shards greedily with whole sources; records each shard once it is in place."""

    def __init__(
        self,
        output_dir: Path,
        input_dir: Path,
        cfg: ShardConfig,
        settings: dict,
        records: dict[int, ShardRecord],
    ) -> None:
        self.output_dir, self.input_dir, self.cfg = output_dir, input_dir, cfg
        self.settings, self.records = settings, records
        self.shard: TarShard | None = None
        self.index = -1
        self._reset()

    def _reset(self) -> None:
        self.sources: dict[str, int] = {}
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.payload_bytes = 0

    def add(self, result: SourceResult) -> None:
        size = sum(sample.size for sample in result.samples)
        if self.shard is not None and (
            len(self.rows) + len(result.samples) > self.cfg.max_samples_per_shard
            or self.payload_bytes + size > self.cfg.max_shard_bytes
        ):
            self.finish()
        if self.shard is None:
            # The lowest free index: shards rebuilt after a crash keep their old names.
            self.index = next(i for i in range(len(self.records) + 1) if i not in self.records)
            self.shard = TarShard(self.output_dir / SHARD_DIR / shard_file_name(self.index))
        relative = f"{SHARD_DIR}/{self.shard.path.name}"
        for sample in result.samples:
            self.shard.add(sample.key, sample.members())
            meta = sample.meta
            self.rows.append({
                "key": sample.key, "shard": relative, "source": result.source,
                "clip_index": meta["clip_index"], "start": meta["start"], "end": meta["end"],
                "quality": {c: meta["quality"][c] for c in CONDITIONS},
            })  # fmt: skip
        self.sources[result.source] = (self.input_dir / result.source).stat().st_size
        self.rejects += result.rejects
        self.payload_bytes += size

    def finish(self) -> None:
        if self.shard is None:
            return
        num_bytes = self.shard.finish()
        record = ShardRecord(
            index=self.index,
            shard=f"{SHARD_DIR}/{self.shard.path.name}",
            bytes=num_bytes,
            sources=self.sources,
            samples=self.rows,
            rejects=self.rejects,
            settings=self.settings,
        )
        save_record(self.output_dir, record)
        self.records[self.index] = record
        log.debug("finished %s: %d samples", record.shard, len(record.samples))
        self.shard = None
        self._reset()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


def _results(
    sources: list[str], input_dir: Path, cfg: ShardConfig, pool: ProcessPoolExecutor | None
) -> Iterator[SourceResult]:
    """process_source over ``sources``, in order, a few sources ahead when pooled."""
    if pool is None:
        for source in sources:
            yield process_source(input_dir / source, source, cfg)
        return
    ahead: deque[Future] = deque()
    queue = iter(sources)
    for source in queue:
        ahead.append(pool.submit(process_source, input_dir / source, source, cfg))
        if len(ahead) >= 2 * cfg.workers:
            break
    while ahead:
        result = ahead.popleft().result()
        next_source = next(queue, None)
        if next_source is not None:
            ahead.append(pool.submit(process_source, input_dir / next_source, next_source, cfg))
        yield result


def run_shard(cfg: ShardConfig) -> dict:
    """Shard ``cfg.input_dir`` into ``cfg.output_dir``; returns the stats (also in stats.json)."""
    input_dir, output_dir = check_dirs(cfg)
    settings = output_fingerprint(cfg)
    sources = scan_inputs(input_dir, exclude=output_dir)
    records = load_records(output_dir, input_dir, settings)
    done = {source for record in records.values() for source in record.sources}
    runs = pending_runs(sources, done)
    todo = sum(len(run) for run in runs)
    log.info(
        "%d inputs in %s: %d already sharded, %d to process",
        len(sources),
        input_dir,
        len(sources) - todo,
        todo,
    )

    input_rejects: list[dict] = []
    packer = ShardPacker(output_dir, input_dir, cfg, settings, records)
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 and todo > 1 else None
    try:
        with tqdm(total=todo, desc="shard", unit="video", disable=None) as bar:
            for run in runs:
                for result in _results(run, input_dir, cfg, pool):
                    if result.samples:
                        packer.add(result)
                    else:
                        input_rejects += result.rejects
                    bar.update(1)
                packer.finish()
    except BaseException:
        packer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    _remove_leftovers(output_dir, records)
    manifest = [row for index in sorted(records) for row in records[index].samples]
    rejects = input_rejects + [row for record in records.values() for row in record.rejects]
    rejects.sort(key=lambda row: (row["source"], row.get("start", -1.0)))
    stats = build_stats(
        sources, manifest, rejects, len(records), sum(record.bytes for record in records.values())
    )
    write_if_changed(output_dir / "manifest.jsonl", _jsonl(manifest))
    write_if_changed(output_dir / "rejects.jsonl", _jsonl(rejects))
    write_if_changed(
        output_dir / "stats.json",
        (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    )
    return stats


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _remove_leftovers(output_dir: Path, records: dict[int, ShardRecord]) -> None:
    """Temp files and shards without a record, left by an interrupted job (they would
    otherwise be read twice or half)."""
    shard_dir = output_dir / SHARD_DIR
    kept = {(output_dir / record.shard).name for record in records.values()}
    for path in sorted(shard_dir.glob("*.tmp")) + sorted(shard_dir.glob("shard-*.tar")):
        if path.name not in kept:
            log.info("removing %s (left by an interrupted run)", path)
            path.unlink()
