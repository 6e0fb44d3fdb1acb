"""Several sources mixed by (scheduled) weights, resolution x length buckets, exact resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from omni_train.curriculum import CurriculumConfig, StageConfig
from omni_train.data import DataConfig, build_loader
from omni_train.data.config import BucketConfig, SourceConfig


@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory, media) -> SimpleNamespace:
    """Source "land": 32x24 clips of 16 frames; source "tall": 24x32 clips of 16 or 24."""
    root = tmp_path_factory.mktemp("mix")
    keys = {"land": set(), "tall": set()}
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
        keys["land"] |= {s["__key__"] for s in land}
        keys["tall"] |= {s["__key__"] for s in tall}
    return SimpleNamespace(root=root, keys=keys)


def _sources(corpus, land=1.0, tall=1.0) -> list[SourceConfig]:
    return [
        SourceConfig("land", str(corpus.root / "land" / "*.tar"), land),
        SourceConfig("tall", str(corpus.root / "tall" / "*.tar"), tall),
    ]


def _cfg(corpus, **overrides) -> DataConfig:
    base = dict(
        shards="",
        sources=_sources(corpus),
        resolution=[16, 16],
        num_frames=9,
        fps=8.0,
        batch_size=2,
        shuffle_buffer=3,
    )
    return DataConfig(**{**base, **overrides})


BUCKETS = [
    BucketConfig([16, 24], 9, 2),  # landscape
    BucketConfig([24, 16], 9, 3),  # portrait, short
    BucketConfig([24, 16], 17, 1),  # portrait, long: only the 24-frame clips fit
]


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _keys(batches):
    return [k for b in batches for k in b.keys]


def test_sources_are_mixed_by_weight(mix_corpus):
    loader = build_loader(_cfg(mix_corpus, sources=_sources(mix_corpus, 3.0, 1.0)), 0, 1, 0)
    keys = _keys(_take(loader, 100))
    share = sum(k in mix_corpus.keys["land"] for k in keys) / len(keys)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / len(keys)) ** 0.5


def test_stage_source_weights_switch_the_mix_at_the_stage_step(mix_corpus):
    curriculum = CurriculumConfig(
        stages=[
            StageConfig("s1", 0, source_weights={"tall": 0.0}),
            StageConfig("s2", 10, source_weights={"land": 0.0}),
        ]
    )
    # 2 micro-batches per step: steps 0-9 are rank batches 0-19.
    loader = build_loader(_cfg(mix_corpus), 0, 1, 0, curriculum=curriculum, grad_accum=2)
    batches = _take(loader, 30)
    assert set(_keys(batches[:20])) <= mix_corpus.keys["land"]
    assert set(_keys(batches[20:])) <= mix_corpus.keys["tall"]


def test_unknown_source_in_a_stage_fails_at_build(mix_corpus):
    curriculum = CurriculumConfig(stages=[StageConfig("s1", 0, source_weights={"web": 1.0})])
    with pytest.raises(ValueError, match="web"):
        build_loader(_cfg(mix_corpus), 0, 1, 0, curriculum=curriculum)


def test_buckets_group_by_aspect_and_length_with_their_batch_sizes(mix_corpus):
    loader = build_loader(_cfg(mix_corpus, buckets=BUCKETS), 0, 1, 0)
    shapes = Counter()
    for batch in _take(loader, 40):
        size, _, frames, height, width = batch.video.shape
        shapes[(size, frames, height, width)] += 1
        tall = [k in mix_corpus.keys["tall"] for k in batch.keys]
        assert all(tall) or not any(tall), "a batch mixes buckets"
        assert all(tall) == (height > width)
        assert batch.audio.shape[1] == round(frames / 8.0 * 16_000)
    assert set(shapes) == {(2, 9, 16, 24), (3, 9, 24, 16), (1, 17, 24, 16)}


def test_a_clip_shorter_than_every_bucket_is_skipped_and_counted(mix_corpus):
    tall = _sources(mix_corpus)[1:]
    cfg = _cfg(mix_corpus, sources=tall, buckets=[BucketConfig([24, 16], 17, 1)])
    loader = build_loader(cfg, 0, 1, 0)
    batches = _take(loader, 6)  # only the 24-frame clips fit
    assert len(set(_keys(batches))) == 2 and loader.corrupt_skipped >= 4
    cfg = _cfg(mix_corpus, buckets=[BucketConfig([16, 16], 33, 1)])  # nothing fits
    with pytest.raises(RuntimeError, match="no sample of data sources"):
        _take(build_loader(cfg, 0, 1, 0), 1)


@pytest.mark.parametrize(("num_workers", "consumed"), [(0, 7), (2, 5)])
def test_resume_with_sources_and_buckets_is_exact(mix_corpus, num_workers, consumed):
    cfg = _cfg(mix_corpus, buckets=BUCKETS, num_workers=num_workers, split="sample")
    straight = _take(build_loader(cfg, 0, 2, seed=4), consumed + 5)
    first = build_loader(cfg, 0, 2, seed=4)
    _take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))
    assert any(w["pending"] for w in state["workers"])  # samples waiting in a bucket
    resumed = _take(build_loader(cfg, 0, 2, seed=4, state=state), 5)
    assert [b.keys for b in resumed] == [b.keys for b in straight[consumed:]]
    assert all(
        r.video.shape == s.video.shape for r, s in zip(resumed, straight[consumed:], strict=True)
    )


def test_a_state_of_another_number_of_sources_is_refused_on_resume(mix_corpus):
    two = _cfg(mix_corpus)
    both = ",".join(source.shards for source in two.sources)  # the same 4 shards
    loader = build_loader(two, 0, 1, seed=4)
    _take(loader, 2)
    one = _cfg(mix_corpus, sources=[SourceConfig("all", both)])
    with pytest.raises(ValueError, match=r"run with \[2\] data source\(s\) and this run has 1"):
        build_loader(one, 0, 1, seed=4, state=loader.state_dict())
    plain = _cfg(mix_corpus, sources=[], shards=both)
    loader = build_loader(plain, 0, 1, seed=4)
    _take(loader, 1)
    with pytest.raises(ValueError, match=r"run with \[1\] data source\(s\) and this run has 2"):
        build_loader(two, 0, 1, seed=4, state=loader.state_dict())


def test_a_source_without_samples_is_refused_naming_its_shards(mix_corpus, media, tmp_path):
    media.write_shard(tmp_path / "shard-000000.tar", [])
    sources = [_sources(mix_corpus)[0], SourceConfig("empty", str(tmp_path / "*.tar"), 1.0)]
    with pytest.raises(ValueError, match="hold no samples: re-run data_pipelines.shard"):
        _take(build_loader(_cfg(mix_corpus, sources=sources), 0, 1, 0), 1)
