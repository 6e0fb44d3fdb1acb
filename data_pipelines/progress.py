"""Progress records: one small json per finished shard, the unit a resumed job trusts.

``OUT/progress/shard-NNNNNN.json`` is written (atomically) right after its shard is renamed
into place. It lists the shard's sources, its manifest rows and the clip-level rejects of
those sources, so a resumed job rebuilds manifest, rejects and stats without reopening any
shard. A record counts only while its tar exists with the recorded size and its sources
still have their recorded sizes; otherwise it is dropped and its sources are sharded again.
"""

from __future__ import annotations

import json
import logging
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
