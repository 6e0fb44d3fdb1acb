"""Deterministic, atomic WebDataset tar shards and atomic small files.

Members carry fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names) and are written
in the order given, so the same samples always give the same bytes. A shard is written as
``NAME.tar.tmp`` and renamed to ``NAME.tar`` only when complete, so a reader (or a resumed
job) never sees half a shard under the final name.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


def shard_file_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


class TarShard:
    """One shard being written; ``add`` samples, then ``finish`` (or ``abort``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))
        self.num_samples += 1

    def finish(self) -> int:
        """Close, move into place, and return the shard's size in bytes."""
        self._tar.close()
        _fsync_replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync_replace(tmp, path)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly ``data``; True if written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    write_atomic(path, data)
    return True
