"""Find shard files and read WebDataset tar samples without touching what is not needed.

A shard is indexed from its tar headers alone (member names, offsets, sizes), so skipping
samples costs no payload reads; the bytes of a sample's mp4 and json members are read only
when the sample is decoded. Members with any other extension (e.g. a ``.pyd`` or ``.pickle``)
are never read, so nothing in a shard can be unpickled or executed.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from typing import NamedTuple

from braceexpand import braceexpand

from omni_train.contracts import SHARD_MEMBERS
from omni_train.data.decode import CorruptSample

log = logging.getLogger(__name__)

# The only members ever read: raw mode reads mp4 + json, precomputed mode json + the arrays
# (numpy .npy, loaded with allow_pickle=False). Anything else in a shard is ignored.
LATENT_MEMBERS: tuple[str, ...] = (
    "json",
    "latents.npy",
    "ref_latents.npy",
    "audio.npy",
    "audio_features.npy",
    "text_embeddings.npy",
)
INDEXED: tuple[str, ...] = tuple(dict.fromkeys(SHARD_MEMBERS + LATENT_MEMBERS))
# WebDataset's key convention: everything before the first dot of the file name.
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class SampleRef(NamedTuple):
    """Where one sample's members live: (extension, byte offset, size) per wanted member."""

    key: str
    shard: str
    members: tuple[tuple[str, int, int], ...]


def held_out(key: str, fraction: float) -> bool:
    """Whether sample ``key`` is in the held-out share ``fraction`` (data.val_holdout).

    A function of the key alone, so every rank, worker, world size and restart agrees.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.sha1(b"omni-train/holdout/" + key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def _split_top_level_commas(pattern: str) -> list[str]:
    """Split on commas that are not inside {...} brace patterns."""
    parts, depth, current = [], 0, []
    for char in pattern:
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def shard_list(pattern: str) -> list[str]:
    """Sorted, de-duplicated shard paths matching a glob / brace pattern / comma list of them."""
    if not pattern or not pattern.strip():
        raise ValueError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
    found: set[str] = set()
    for part in _split_top_level_commas(pattern):
        matched = [
            path
            for expanded in braceexpand(part)
            for path in glob.glob(os.path.expanduser(expanded))
            if os.path.isfile(path)
        ]
        if not matched:
            raise ValueError(
                f"data.shards={pattern!r}: {part!r} matches no file; point it at the shards "
                "written by data_pipelines.shard, e.g. 'OUT/shards/*.tar'"
            )
        found.update(matched)
    return sorted(found)


def index_shard(path: str) -> list[SampleRef]:
    """The samples of one tar shard, in tar order, from its headers only.

    Members sharing a key must be adjacent (as WebDataset writes them). A shard that cannot be
    opened yields no samples and a truncated one yields the samples before the damage; both
    are logged. Either way the result is the same every time, which keeps streams exact.
    """
    refs: list[SampleRef] = []
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _KEY_AND_EXT.match(info.name)
                if match is None:
                    continue
                member_key, ext = match.group(1), match.group(2).lower()
                if member_key != key:
                    if key is not None:
                        refs.append(_ref(key, path, members))
                    key, members = member_key, {}
                if ext in INDEXED and ext not in members:
                    members[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as err:
        log.warning("shard %s is unreadable after %d samples: %s", path, len(refs), err)
        key = None  # the sample being read when the damage was found is not trusted
    if key is not None:
        refs.append(_ref(key, path, members))
    return refs


def _ref(key: str, path: str, members: dict[str, tuple[int, int]]) -> SampleRef:
    return SampleRef(key, path, tuple((ext, *members[ext]) for ext in INDEXED if ext in members))


def read_sample(ref: SampleRef, wanted: tuple[str, ...] = SHARD_MEMBERS) -> dict[str, object]:
    """{"__key__": key, ext: bytes, ...} for the ``wanted`` members the sample has."""
    sample: dict[str, object] = {"__key__": ref.key}
    try:
        with open(ref.shard, "rb") as handle:
            for ext, offset, size in ref.members:
                if ext not in wanted:
                    continue
                handle.seek(offset)
                payload = handle.read(size)
                if len(payload) != size:
                    raise CorruptSample(ref.key, f"{ext} member is truncated in {ref.shard}")
                sample[ext] = payload
    except OSError as err:
        raise CorruptSample(ref.key, f"cannot read {ref.shard}: {err}") from err
    return sample
