"""The data order, pinned: the first batches of a single-source stream and of a mix of sources
and buckets, as keys (by their index in the corpus) and the decoded window's frames.

The expected values were recorded from the loader as it stood before its single-source path
became the one-source case of the mixed stream, so any change to the order of samples, their
grouping into batches or the randomness of their decoding fails here. The corpora's keys and
frames are deterministic (keys hash the clip names, frame i is gray level 10 i). Loader states
that version saved (state version 1, literal dicts below) still resume to the same order.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from omni_train.data import DataConfig, build_loader, elastic_loader_state
from omni_train.data.config import BucketConfig, SourceConfig
from omni_train.data.state import LoaderState


def _cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(
        shards=pattern,
        resolution=[16, 16],
        num_frames=9,
        fps=8.0,
        batch_size=2,
        shuffle_buffer=4,
        worker_start_method="fork",
    )
    return DataConfig(**{**base, **overrides})


def _frame(level: float) -> int:
    """The source frame index of a decoded gray value in [-1, 1] (frame i is level 10 i)."""
    return round((level + 1) / 2 * 255 / 10)


def _batches(loader, count: int, keys: list[str], frames: bool = False) -> list[list]:
    """Per batch: the corpus index of each key, with (first window frame, reference frame)."""
    out = []
    for batch in itertools.islice(iter(loader), count):
        indices = [keys.index(key) for key in batch.keys]
        if frames:
            video, ref = batch.video, batch.ref
            indices = [
                [i, _frame(float(video[b, 0, 0, 0, 0])), _frame(float(ref[b, 0, 0, 0]))]
                for b, i in enumerate(indices)
            ]
        out.append(indices)
    return out


# ----------------------------------------------------------------------------- single source
def single_source_streams(corpus) -> dict[str, list]:
    """Every rank's first batches for two layouts and seeds, past the end of a first epoch."""
    streams = {}
    cfg = _cfg(corpus.pattern, num_workers=2, split="shard")  # 4 consumers x 6 samples
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=3)
        streams[f"shard_w2_rank{rank}"] = _batches(loader, 8, corpus.keys, frames=True)
    cfg = _cfg(corpus.pattern, split="sample", shuffle_buffer=3)  # 3 consumers x 8 samples
    for rank in range(3):
        loader = build_loader(cfg, rank, 3, seed=9)
        streams[f"sample_rank{rank}"] = _batches(loader, 6, corpus.keys)
    return streams


def single_source_handover(corpus) -> list[list]:
    """2 ranks take 2 batches each, then 1 rank with 2 workers reads the rest and goes on."""
    old, new = _cfg(corpus.pattern), _cfg(corpus.pattern, num_workers=2)
    states = []
    for rank in range(2):
        loader = build_loader(old, rank, 2, seed=5)
        _batches(loader, 2, corpus.keys)
        states.append(json.loads(json.dumps(loader.state_dict())))
    state = elastic_loader_state(states, 0, 1, new)
    return _batches(build_loader(new, 0, 1, seed=5, state=state), 14, corpus.keys, frames=True)


SINGLE_SOURCE = {
    "shard_w2_rank0": [
        [[14, 3, 2], [13, 2, 14]],
        [[5, 1, 10], [15, 3, 14]],
        [[1, 6, 0], [12, 6, 2]],
        [[16, 6, 15], [17, 7, 6]],
        [[2, 1, 12], [0, 4, 0]],
        [[3, 6, 5], [4, 4, 1]],
        [[0, 6, 15], [12, 6, 5]],
        [[5, 5, 15], [15, 4, 13]],
    ],
    "shard_w2_rank1": [
        [[20, 7, 2], [19, 1, 0]],
        [[10, 7, 0], [22, 5, 14]],
        [[6, 5, 15], [7, 0, 12]],
        [[11, 5, 3], [9, 7, 1]],
        [[18, 1, 13], [8, 0, 15]],
        [[23, 5, 15], [21, 4, 15]],
        [[7, 3, 14], [19, 2, 1]],
        [[22, 1, 13], [21, 4, 3]],
    ],
    "sample_rank0": [[18, 12], [15, 3], [21, 9], [0, 6], [12, 18], [6, 15]],
    "sample_rank1": [[13, 19], [4, 16], [10, 1], [22, 7], [4, 13], [19, 7]],
    "sample_rank2": [[17, 14], [11, 5], [23, 2], [8, 20], [14, 5], [20, 11]],
}
SINGLE_SOURCE_HANDOVER = [
    [[6, 5, 3], [14, 1, 13]],
    [[13, 7, 0], [8, 2, 12]],
    [[1, 3, 12], [12, 4, 2]],
    [[0, 0, 13], [2, 1, 13]],
    [[10, 3, 14], [15, 1, 10]],
    [[22, 1, 11], [9, 6, 2]],
    [[11, 3, 2], [3, 6, 3]],
    [[17, 5, 15], [16, 6, 15]],
    [[7, 1, 11], [6, 7, 1]],
    [[17, 0, 9], [4, 0, 11]],
    [[2, 0, 14], [8, 3, 1]],
    [[3, 5, 4], [9, 7, 0]],
    [[18, 1, 11], [0, 2, 0]],
    [[10, 5, 4], [16, 0, 10]],
]


def test_single_source_order_is_pinned(corpus):
    assert single_source_streams(corpus) == SINGLE_SOURCE


def test_single_source_order_after_a_handover_is_pinned(corpus):
    assert single_source_handover(corpus) == SINGLE_SOURCE_HANDOVER


# ----------------------------------------------------------------------------- a mix
@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory, media) -> SimpleNamespace:
    """Source "land": 32x24 clips of 16 frames; source "tall": 24x32 clips of 16 or 24."""
    root = tmp_path_factory.mktemp("pins_mix")
    keys = []
    for shard in range(2):
        land = [media.make_sample(f"land_{shard}_{i}.mp4") for i in range(3)]
        tall = [
            media.make_sample(
                f"tall_{shard}_{i}.mp4", num_frames=16 + 8 * (i % 2), height=32, width=24
            )
            for i in range(3)
        ]
        media.write_shard(root / "land" / f"shard-{shard:06d}.tar", land)
        media.write_shard(root / "tall" / f"shard-{shard:06d}.tar", tall)
        keys += [s["__key__"] for s in land + tall]
    return SimpleNamespace(root=root, keys=keys)


def _mix_cfg(corpus, **overrides) -> DataConfig:
    sources = [
        SourceConfig("land", str(corpus.root / "land" / "*.tar"), 1.0),
        SourceConfig("tall", str(corpus.root / "tall" / "*.tar"), 2.0),
    ]
    buckets = [
        BucketConfig([16, 24], 9, 2),
        BucketConfig([24, 16], 9, 3),
        BucketConfig([24, 16], 17, 1),
    ]
    return _cfg("", sources=sources, buckets=buckets, shuffle_buffer=3, **overrides)


def mixed_streams(corpus) -> dict[str, list]:
    streams = {}
    cfg = _mix_cfg(corpus, split="sample")
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=4)
        streams[f"rank{rank}"] = _batches(loader, 10, corpus.keys, frames=True)
    loader = build_loader(_mix_cfg(corpus, num_workers=2), 0, 1, seed=6)
    streams["workers2"] = _batches(loader, 10, corpus.keys)
    return streams


MIXED = {
    "rank0": [
        [[10, 4, 3]],
        [[7, 3, 15], [0, 0, 12]],
        [[5, 4, 0], [3, 7, 3], [9, 7, 3]],
        [[4, 0, 17]],
        [[10, 3, 0]],
        [[11, 7, 2], [3, 1, 13], [5, 2, 13]],
        [[10, 6, 2]],
        [[5, 6, 2], [3, 3, 12], [11, 7, 6]],
        [[4, 4, 1]],
        [[10, 0, 22]],
    ],
    "rank1": [
        [[8, 1, 12], [1, 0, 13]],
        [[6, 7, 5], [7, 7, 6]],
        [[4, 7, 2]],
        [[10, 7, 5]],
        [[11, 1, 13], [9, 6, 5], [3, 0, 10]],
        [[0, 6, 2], [2, 3, 15]],
        [[5, 0, 15], [11, 5, 2], [9, 3, 13]],
        [[1, 4, 2], [6, 3, 14]],
        [[4, 3, 0]],
        [[4, 4, 21]],
    ],
    "workers2": [[4], [10], [2, 0], [10], [1, 0], [11, 9, 11], [5, 3, 5], [9, 9, 11], [1, 2], [10]],
}


def test_mixed_order_is_pinned(mix_corpus):
    assert mixed_streams(mix_corpus) == MIXED


# ----------------------------------------------------------------------------- version 1 states
# Loader states as the version 1 loader saved them into checkpoints (before every config read
# through the one stream of omni_train.data.consumer).

# 2 ranks x 0 workers took 2 batches each; then 1 rank x 2 workers took 3 more (seed 5).
V1_AFTER_HANDOVER = {
    "seed": 5,
    "rank": 0,
    "world_size": 1,
    "num_workers": 2,
    "num_shards": 8,
    "batches": 5,
    "workers": [
        {"yielded": 4, "corrupt": 0, "picks": 0, "batches": 0, "sources": [], "pending": []},
        {"yielded": 2, "corrupt": 0, "picks": 0, "batches": 0, "sources": [], "pending": []},
    ],
    "handover": {
        "generation": 1,
        "world_size": 2,
        "workers": 1,
        "shuffle_buffer": 4,
        "raw": [4, 4],
        "previous": None,
        "split": "shard",
    },
    "corrupt_before": 0,
    "val_holdout": 0.0,
    "version": 1,
    "corrupt_skipped": 0,
}
# The keys of 2 ranks x 0 workers continuing it, as the version 1 loader dealt them.
V1_AFTER_HANDOVER_ON_2_RANKS = [
    [[10, 11], [0, 22], [17, 13], [7, 8], [6, 14], [1, 2]],
    [[15, 3], [2, 9], [16, 15], [23, 21], [9, 16], [17, 10]],
]
# Rank 1 of 2 x 0 workers after the next handover, from V1_AFTER_HANDOVER, and 1 batch.
V1_TWO_HANDOVERS = {
    "seed": 5,
    "rank": 1,
    "world_size": 2,
    "num_workers": 0,
    "num_shards": 8,
    "batches": 6,
    "workers": [
        {"yielded": 2, "corrupt": 0, "picks": 0, "batches": 0, "sources": [], "pending": []}
    ],
    "handover": {
        "generation": 2,
        "world_size": 1,
        "workers": 2,
        "shuffle_buffer": 4,
        "raw": [4, 2],
        "previous": V1_AFTER_HANDOVER["handover"],
        "split": "shard",
    },
    "corrupt_before": 0,
    "val_holdout": 0.0,
    "version": 1,
    "corrupt_skipped": 0,
}
# Rank 0 of 2 of the mix (split=sample, seed 4) after 4 batches: sample 4 of source 1 waits.
V1_MIX = {
    "seed": 4,
    "rank": 0,
    "world_size": 2,
    "num_workers": 0,
    "num_shards": 4,
    "batches": 4,
    "workers": [
        {
            "yielded": 7,
            "corrupt": 0,
            "picks": 8,
            "batches": 4,
            "sources": [2, 6],
            "pending": [[1, 4]],
        }
    ],
    "handover": None,
    "corrupt_before": 0,
    "val_holdout": 0.0,
    "version": 1,
    "corrupt_skipped": 0,
}
# 2 batches of the corrupt corpus below (seed 0): 4 samples handed out, 1 skipped.
V1_CORRUPT = {
    "seed": 0,
    "rank": 0,
    "world_size": 1,
    "num_workers": 0,
    "num_shards": 2,
    "batches": 2,
    "workers": [
        {"yielded": 4, "corrupt": 1, "picks": 0, "batches": 0, "sources": [], "pending": []}
    ],
    "handover": None,
    "corrupt_before": 0,
    "val_holdout": 0.0,
    "version": 1,
    "corrupt_skipped": 1,
}


@pytest.fixture()
def corrupt_corpus(media, tmp_path) -> SimpleNamespace:
    """5 good clips and a broken one (index 5), in 2 shards."""
    good = [media.make_sample(f"v1good{i}.mp4") for i in range(5)]
    broken = media.make_sample("v1broken.mp4")
    broken["mp4"] = b"\x00" * 300
    media.write_shard(tmp_path / "shard-000000.tar", good[:2] + [broken] + good[2:3])
    media.write_shard(tmp_path / "shard-000001.tar", good[3:])
    keys = [s["__key__"] for s in good + [broken]]
    return SimpleNamespace(pattern=str(tmp_path / "*.tar"), keys=keys)


def test_a_version_1_state_resumes_the_pinned_order(corpus):
    loader = build_loader(
        _cfg(corpus.pattern, num_workers=2), 0, 1, seed=5, state=V1_AFTER_HANDOVER
    )
    assert _batches(loader, 6, corpus.keys, frames=True) == SINGLE_SOURCE_HANDOVER[3:9]


def test_a_version_1_state_goes_on_to_another_world_size(corpus):
    cfg = _cfg(corpus.pattern)
    keys = []
    for rank in range(2):
        state = elastic_loader_state([V1_AFTER_HANDOVER], rank, 2, cfg)
        keys.append(_batches(build_loader(cfg, rank, 2, seed=5, state=state), 6, corpus.keys))
    assert keys == V1_AFTER_HANDOVER_ON_2_RANKS


def test_a_version_1_mix_resumes_with_its_waiting_sample(mix_corpus):
    loader = build_loader(_mix_cfg(mix_corpus, split="sample"), 0, 2, seed=4, state=V1_MIX)
    assert _batches(loader, 5, mix_corpus.keys, frames=True) == MIXED["rank0"][4:9]


def test_a_version_1_state_keeps_its_corrupt_count(corrupt_corpus):
    loader = build_loader(_cfg(corrupt_corpus.pattern), 0, 1, seed=0, state=V1_CORRUPT)
    batches, counts = [], []
    for batch in itertools.islice(iter(loader), 3):
        batches.append(batch)
        counts.append(loader.corrupt_skipped)
    assert [[corrupt_corpus.keys.index(k) for k in b.keys] for b in batches] == [
        [3, 1],
        [0, 3],
        [2, 4],
    ]
    assert counts == [2, 2, 2]


def _state_after(cfg, world_size, batches, seed, rank=0, states=None) -> dict:
    """The saved state of ``rank`` after ``batches`` batches (after a handover from
    ``states`` when given)."""
    state = None if states is None else elastic_loader_state(states, rank, world_size, cfg)
    loader = build_loader(cfg, rank, world_size, seed=seed, state=state)
    list(itertools.islice(iter(loader), batches))
    return json.loads(json.dumps(loader.state_dict()))


def test_a_version_1_state_becomes_what_version_2_saves_at_the_same_point(
    corpus, mix_corpus, corrupt_corpus
):
    plain = _cfg(corpus.pattern)
    old = [_state_after(plain, 2, 2, seed=5, rank=rank) for rank in range(2)]
    handed_over = _state_after(_cfg(corpus.pattern, num_workers=2), 1, 3, seed=5, states=old)
    twice = _state_after(plain, 2, 1, seed=5, rank=1, states=[handed_over])
    mix = _state_after(_mix_cfg(mix_corpus, split="sample"), 2, 4, seed=4)
    corrupt = _state_after(_cfg(corrupt_corpus.pattern), 1, 2, seed=0)
    pairs = [
        (V1_AFTER_HANDOVER, handed_over),
        (V1_TWO_HANDOVERS, twice),
        (V1_MIX, mix),
        (V1_CORRUPT, corrupt),
    ]
    for v1, v2 in pairs:
        assert v2["version"] == 2
        assert LoaderState.from_dict(v1).to_dict() == v2


@pytest.mark.parametrize("version", [None, 0, 3])
def test_a_state_of_an_unknown_version_is_refused_naming_it(corpus, version):
    state = {**V1_AFTER_HANDOVER, "version": version}
    with pytest.raises(ValueError) as caught:
        build_loader(_cfg(corpus.pattern, num_workers=2), 0, 1, seed=5, state=state)
    message = str(caught.value)
    assert f"loader state version {version!r} cannot be read" in message
    assert "versions [1, 2]" in message and "start a new run_dir" in message
