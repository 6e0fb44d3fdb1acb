"""Progress records: one small json per finished shard, the unit a resumed job trusts.

``OUT/progress/shard-NNNNNN.json`` is written (atomically) right after its shard is renamed
into place. It lists the shard's sources, its manifest rows and the clip-level rejects of
those sources, so a resumed job rebuilds manifest, rejects and stats without reopening any
shard. A record counts only while its tar exists with the recorded size and its sources
still have their recorded sizes; otherwise it is dropped and its sources are sharded again.

``OUT/status.json`` (see ``LiveStatus``) shows a run's progress while it works.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipelines.writer import write_atomic

log = logging.getLogger(__name__)

RECORD_DIR = "progress"
SHARD_DIR = "shards"
VERSION = 2  # 2: settings include the annotators and the backends they resolved to


class SettingsMismatch(ValueError):
    """The output_dir was written with settings that change the outputs."""


@dataclass
class ShardRecord:
    index: int
    shard: str  # path relative to output_dir
    bytes: int
    sources: dict[str, int]  # source -> its file size when sharded
    samples: list[dict]  # manifest rows
    rejects: list[dict]  # clip-level rejects of these sources
    settings: dict
    version: int = VERSION


def record_path(output_dir: Path, index: int) -> Path:
    return output_dir / RECORD_DIR / f"shard-{index:06d}.json"


def save_record(output_dir: Path, record: ShardRecord) -> None:
    data = json.dumps(asdict(record), ensure_ascii=False, indent=1) + "\n"
    write_atomic(record_path(output_dir, record.index), data.encode("utf-8"))


def load_records(output_dir: Path, input_dir: Path, settings: dict) -> dict[int, ShardRecord]:
    """The trustworthy records by shard index; stale ones are deleted (and logged)."""
    records: dict[int, ShardRecord] = {}
    for path in sorted((output_dir / RECORD_DIR).glob("shard-*.json")):
        record = _read(path)
        if record is None:
            path.unlink()
            continue
        if record.settings != settings:
            raise SettingsMismatch(_mismatch_message(output_dir, record.settings, settings))
        problem = _staleness(output_dir, input_dir, record)
        if problem:
            log.info("re-sharding %s: %s", record.shard, problem)
            path.unlink()
            continue
        records[record.index] = record
    return records


def _read(path: Path) -> ShardRecord | None:
    try:
        record = ShardRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        log.warning("dropping unreadable progress record %s: %s", path, err)
        return None
    return record if record.version == VERSION else None


def _staleness(output_dir: Path, input_dir: Path, record: ShardRecord) -> str | None:
    shard = output_dir / record.shard
    if not shard.is_file():
        return "the shard file is missing"
    if shard.stat().st_size != record.bytes:
        return f"the shard has {shard.stat().st_size} bytes, {record.bytes} were written"
    for source, size in record.sources.items():
        path = input_dir / source
        if path.is_file() and path.stat().st_size != size:
            return f"input {source} changed size since it was sharded"
    return None


def _mismatch_message(output_dir: Path, old: dict, new: dict) -> str:
    changed = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return (
        f"output_dir={output_dir} holds shards written with other settings "
        f"({'; '.join(changed)}). Use a new output_dir, or delete {output_dir} to re-shard."
    )


# Live status: OUT/status.json while a run works (and after it stopped or died), so that
# ``python -m data_pipelines.status`` can show every partition of a cluster job. A run that
# finishes removes it: the finished run is described by stats.json, and the outputs of a
# finished run stay byte-identical whoever ran it, when and where.
STATUS_FILE = "status.json"
STATUS_EVERY_SECONDS = 2.0
# Reject reasons that are failures of the job, not of the input: a re-run retries them.
FAILURE_REASONS = ("internal_error", "worker_crashed")


@dataclass
class RunStatus:
    sources_total: int  # sources of this run (of this partition)
    sources_done: int  # including the ones earlier runs sharded
    clips: int  # clips sharded by this run
    clips_per_second: float
    eta_seconds: float | None
    rejects: int  # reject rows (inputs and clips) of this run
    failures: int  # sources with a FAILURE_REASONS reject in this run
    failed_sources: list[str]
    started: float  # unix time
    updated: float
    host: str
    pid: int
    state: str = "running"  # or "stopped: WHY" when the run raised; a finished run has no file


def status_path(output_dir: Path) -> Path:
    return output_dir / STATUS_FILE


def read_status(output_dir: Path) -> RunStatus | None:
    path = status_path(output_dir)
    try:
        return RunStatus(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        log.warning("ignoring unreadable status file %s: %s", path, err)
        return None


class LiveStatus:
    """Counts a run's progress and writes it (atomically) at most every ``every`` seconds."""

    def __init__(self, output_dir: Path, total: int, done: int, every: float | None = None) -> None:
        self.path = status_path(output_dir)
        self.every = STATUS_EVERY_SECONDS if every is None else every
        self.done_before, self.last_write = done, float("-inf")
        now = time.time()
        self.status = RunStatus(
            sources_total=total, sources_done=done, clips=0, clips_per_second=0.0,
            eta_seconds=None, rejects=0, failures=0, failed_sources=[], started=now,
            updated=now, host=socket.gethostname(), pid=os.getpid(),
        )  # fmt: skip

    def source_done(self, source: str, clips: int, rejects: list[dict]) -> None:
        status = self.status
        status.sources_done += 1
        status.clips += clips
        status.rejects += len(rejects)
        if any(row["reason"] in FAILURE_REASONS for row in rejects):
            status.failures += 1
            status.failed_sources.append(source)
        self.write()

    def write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_write < self.every:
            return
        status = self.status
        elapsed = max(now - status.started, 1e-9)
        status.updated = now
        status.clips_per_second = round(status.clips / elapsed, 3)
        processed = status.sources_done - self.done_before
        remaining = status.sources_total - status.sources_done
        status.eta_seconds = round(remaining * elapsed / processed, 1) if processed else None
        data = json.dumps(asdict(status), ensure_ascii=False, indent=1) + "\n"
        write_atomic(self.path, data.encode("utf-8"))
        self.last_write = now

    def stopped(self, why: str) -> None:
        self.status.state = f"stopped: {why}"
        self.write(force=True)

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)
