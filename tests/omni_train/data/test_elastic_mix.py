"""A change of world size or workers with data.sources and/or data.buckets: the rest of the
interrupted epoch of every source (samples waiting in a bucket included) is read exactly once,
and the mixing weights go on from the saved step."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from omni_train.curriculum import CurriculumConfig, StageConfig
from omni_train.data import DataConfig, build_loader, shard_list
from omni_train.data.config import BucketConfig, SourceConfig
from omni_train.data.consumer import source_seed
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.plan import ConsumerPlan, resolve_split

SEED = 5
PER_SOURCE = 12  # clips per source: 2 shards x 6
BUCKETS = [
    BucketConfig([16, 24], 9, 2),  # landscape
    BucketConfig([24, 16], 9, 3),  # portrait, short: its samples wait longest
    BucketConfig([24, 16], 17, 1),  # portrait, long: only the 24-frame clips fit
]


@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory, media) -> SimpleNamespace:
    """Source "land": 32x24 clips of 16 frames; source "tall": 24x32 clips of 16 or 24
    frames; each in 2 shards."""
    root = tmp_path_factory.mktemp("elastic_mix")
    keys = {"land": [], "tall": []}
    for shard in range(2):
        land = [media.make_sample(f"land_{shard}_{i}.mp4") for i in range(PER_SOURCE // 2)]
        tall = [
            media.make_sample(
                f"tall_{shard}_{i}.mp4", num_frames=16 + 8 * (i % 2), height=32, width=24
            )
            for i in range(PER_SOURCE // 2)
        ]
        media.write_shard(root / "land" / f"shard-{shard:06d}.tar", land)
        media.write_shard(root / "tall" / f"shard-{shard:06d}.tar", tall)
        keys["land"] += [s["__key__"] for s in land]
        keys["tall"] += [s["__key__"] for s in tall]
    return SimpleNamespace(root=root, keys=keys)


def _cfg(corpus, mix: str, **overrides) -> DataConfig:
    """mix: "sources", "buckets" (one source, the tall clips) or "both"."""
    sources = [
        SourceConfig("land", str(corpus.root / "land" / "*.tar"), 1.0),
        SourceConfig("tall", str(corpus.root / "tall" / "*.tar"), 1.0),
    ]
    base = dict(
        shards="",
        sources=sources,
        resolution=[16, 16],
        num_frames=9,
        fps=8.0,
        batch_size=2,
        shuffle_buffer=3,
        worker_start_method="fork",
    )
    if mix == "buckets":
        base.update(shards=sources[1].shards, sources=[])
    if mix in ("buckets", "both"):
        base["buckets"] = BUCKETS
    return DataConfig(**{**base, **overrides})


def _keys(loader, batches: int) -> list[str]:
    return [k for batch in itertools.islice(iter(loader), batches) for k in batch.keys]


def _run_layout(cfg, world_size, batches, states=None, curriculum=None):
    """Every rank's keys over ``batches`` batches and its state_dict afterwards."""
    keys, saved = [], []
    for rank in range(world_size):
        state = None if states is None else elastic_loader_state(states, rank, world_size, cfg)
        loader = build_loader(cfg, rank, world_size, SEED, state, curriculum=curriculum)
        keys.append(_keys(loader, batches))
        saved.append(json.loads(json.dumps(loader.state_dict())))
    return keys, saved


def _source_keys(corpus, cfg) -> list[list[str]]:
    return [corpus.keys["tall"]] if not cfg.sources else [corpus.keys["land"], corpus.keys["tall"]]


def _tail_sizes(before: list[str], source_keys: list[list[str]], consumers: int) -> list[list[int]]:
    """[consumer][source] share of what the old layout left, from the keys it handed out:
    a source's epoch less those keys, dealt round robin."""
    left = [len(keys) - sum(k in keys for k in before) for keys in source_keys]
    return [[len(range(c, n, consumers)) for n in left] for c in range(consumers)]


def _resume_until_tails_are_read(cfg, states, world_size, tails):
    """Run each new rank until every consumer has taken its tail of every source and handed
    out all of it; returns (keys handed out, final states)."""
    workers = max(1, cfg.num_workers)
    keys, finals = [], []
    for rank in range(world_size):
        state = elastic_loader_state(states, rank, world_size, cfg)
        loader = build_loader(cfg, rank, world_size, SEED, state)
        for count, batch in enumerate(loader, start=1):
            keys += batch.keys
            positions = loader.state_dict()["workers"]
            done = all(
                len(p["sources"]) == len(tail)
                and all(p["sources"][s] >= size for s, size in enumerate(tail))
                and all(i >= tail[s] for s, i in p["pending"])
                for p, tail in zip(positions, tails[rank * workers :], strict=False)
            )
            if done:
                break
            assert count < 80, "the new layout never finished the tails"
        finals.append(json.loads(json.dumps(loader.state_dict())))
    return keys, finals


def _own_epoch_keys(cfg, finals, world_size, tails) -> list[str]:
    """Keys handed out after the tails, from the new layout's own epochs: positions past a
    consumer's tail that are not waiting in a bucket."""
    sources = [shard_list(s.shards) for s in cfg.source_list()]
    workers = max(1, cfg.num_workers)
    consumers = world_size * workers
    own = []
    for state in finals:
        for w, position in enumerate(state["workers"]):
            consumer = state["rank"] * workers + w
            for s, shards in enumerate(sources):
                plan = ConsumerPlan(
                    shards,
                    source_seed(SEED, s),
                    cfg.shuffle_buffer,
                    consumer,
                    consumers,
                    state["handover"]["sources"][s],
                    split=resolve_split(cfg.split, len(shards), consumers),
                )
                size, dealt = tails[consumer][s], len(plan.tail)
                assert dealt == size, f"consumer {consumer}, source {s}: tail of {dealt}"
                pending = {i for source, i in position["pending"] if source == s}
                taken = [i for i in range(size, position["sources"][s]) if i not in pending]
                own += [ref.key for _, ref in plan.refs_at(taken)]
    return own


def _assert_epoch_read_once(corpus, cfg, old_layout, new_layout, before_batches):
    (old_ranks, old_workers), (new_ranks, new_workers) = old_layout, new_layout
    old_cfg = _cfg(corpus, cfg, num_workers=old_workers)
    new_cfg = _cfg(corpus, cfg, num_workers=new_workers)
    before, states = _run_layout(old_cfg, old_ranks, before_batches)
    before = [k for keys in before for k in keys]
    old_positions = [p for s in states for p in s["workers"]]
    if old_cfg.buckets:
        assert any(p["pending"] for p in old_positions), "no sample was waiting in a bucket"
    # Every old consumer is still in its first epoch of every source.
    assert max(n for p in old_positions for n in p["sources"]) <= PER_SOURCE // len(old_positions)
    assert all(p["corrupt"] == 0 for p in old_positions)

    source_keys = _source_keys(corpus, new_cfg)
    tails = _tail_sizes(before, source_keys, new_ranks * max(1, new_workers))
    after, finals = _resume_until_tails_are_read(new_cfg, states, new_ranks, tails)
    own = _own_epoch_keys(new_cfg, finals, new_ranks, tails)
    epoch = Counter(before) + Counter(after)
    epoch.subtract(own)
    counts = Counter(epoch.values())
    expected = Counter(k for keys in source_keys for k in keys)
    skipped = [k for k in expected if epoch[k] == 0]
    twice = [k for k in expected if epoch[k] > 1]
    assert (skipped, twice) == ([], []), f"skipped {skipped}, read twice {twice}"
    assert +epoch == expected, counts
    # Each source's rest went to the new consumers in shares that differ by at most one.
    for s in range(len(source_keys)):
        sizes = [tail[s] for tail in tails]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("mix", ["both", "sources", "buckets"])
@pytest.mark.parametrize(
    ("old_layout", "new_layout", "before_batches"),
    [((2, 0), (1, 0), 2), ((1, 0), (2, 0), 2), ((1, 0), (1, 2), 1)],
    ids=["2to1", "1to2", "workers0to2"],
)
def test_the_interrupted_epoch_of_every_source_and_bucket_is_read_once(
    mix_corpus, mix, old_layout, new_layout, before_batches
):
    _assert_epoch_read_once(mix_corpus, mix, old_layout, new_layout, before_batches)


def test_a_mix_can_change_layout_twice_and_resume_exactly_after(mix_corpus):
    cfg1, cfg2 = _cfg(mix_corpus, "both"), _cfg(mix_corpus, "both", num_workers=2)
    _, first = _run_layout(cfg1, 2, 2)
    _, second = _run_layout(cfg1, 1, 2, first)
    keys, third = _run_layout(cfg2, 2, 3, second)
    assert third[0]["handover"]["generation"] == 2
    assert [s["previous"]["generation"] for s in third[0]["handover"]["sources"]] == [1, 1]
    # Resuming the twice-handed-over state on the same layout continues it exactly.
    again = build_loader(cfg2, 1, 2, SEED, state=third[1])
    straight_state = elastic_loader_state(second, 1, 2, cfg2)
    straight = _keys(build_loader(cfg2, 1, 2, SEED, state=straight_state), 6)
    assert keys[1] == straight[: len(keys[1])]
    assert _keys(again, 3) == straight[len(keys[1]) :]


def test_the_stage_weights_go_on_from_the_saved_step(mix_corpus):
    # Steps 0-9 read only "land", from step 10 only "tall" (one batch per step).
    curriculum = CurriculumConfig(
        stages=[
            StageConfig("s1", 0, source_weights={"tall": 0.0}),
            StageConfig("s2", 10, source_weights={"land": 0.0}),
        ]
    )
    old_cfg = _cfg(mix_corpus, "sources")
    new_cfg = _cfg(mix_corpus, "sources", num_workers=2)
    _, states = _run_layout(old_cfg, 2, 3, curriculum=curriculum)  # steps 0-2
    state = elastic_loader_state(states, 0, 1, new_cfg)
    assert state["batches"] == 3
    loader = build_loader(new_cfg, 0, 1, SEED, state, curriculum=curriculum)
    batches = list(itertools.islice(iter(loader), 12))  # steps 3-14
    land, tall = set(mix_corpus.keys["land"]), set(mix_corpus.keys["tall"])
    assert [set(b.keys) <= land for b in batches] == [True] * 7 + [False] * 5
    assert [set(b.keys) <= tall for b in batches] == [False] * 7 + [True] * 5


def test_a_state_the_config_cannot_continue_is_refused_with_the_fix(mix_corpus):
    mixed = _cfg(mix_corpus, "both")
    _, states = _run_layout(mixed, 2, 1)
    single = _cfg(mix_corpus, "sources", sources=[], shards=mixed.sources[0].shards)
    with pytest.raises(ValueError, match="this run has neither"):
        elastic_loader_state(states, 0, 1, single)
    one_source = _cfg(mix_corpus, "both", sources=mixed.sources[:1])
    with pytest.raises(ValueError, match=r"\[2\] data source\(s\) and this run has 1"):
        elastic_loader_state(states, 0, 1, one_source)
    _, plain = _run_layout(single, 2, 1)
    with pytest.raises(ValueError, match="without data.sources and data.buckets"):
        elastic_loader_state(plain, 0, 1, mixed)
