"""data.val_holdout: a share of the training samples, chosen by key, that no rank, worker,
layout or resumed run ever trains on."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from omni_train.data import DataConfig, build_loader
from omni_train.data.config import SourceConfig
from omni_train.data.consumer import ConsumerBatches
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.plan import ShardIndex
from omni_train.data.shards import held_out, shard_list
from omni_train.data.state import ConsumerPosition

SHARE = 0.25


def _expected_held(keys: list[str], share: float) -> set[str]:
    """The definition, computed independently: the key's salted SHA-1 as a fraction of 2^64."""
    held = set()
    for key in keys:
        digest = hashlib.sha1(b"omni-train/holdout/" + key.encode()).digest()
        if int.from_bytes(digest[:8], "little") / 2**64 < share:
            held.add(key)
    return held


def _cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(
        shards=pattern,
        resolution=[16, 16],
        num_frames=9,
        fps=8.0,
        batch_size=2,
        shuffle_buffer=4,
        val_holdout=SHARE,
    )
    return DataConfig(**{**base, **overrides})


def _keys(loader, batches: int) -> list[str]:
    return [k for batch in itertools.islice(iter(loader), batches) for k in batch.keys]


def test_held_out_is_the_keyed_share_and_grows_with_it(corpus):
    held = {k for k in corpus.keys if held_out(k, SHARE)}
    assert held == _expected_held(corpus.keys, SHARE)
    assert 0 < len(held) < len(corpus.keys)  # the corpus exercises both sides
    assert not any(held_out(k, 0.0) for k in corpus.keys)
    assert held <= {k for k in corpus.keys if held_out(k, 0.5)}


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_no_rank_or_worker_ever_yields_a_held_out_key(corpus, split):
    held = _expected_held(corpus.keys, SHARE)
    kept = set(corpus.keys) - held
    cfg = _cfg(corpus.pattern, split=split)
    seen: list[str] = []
    for rank in range(2):
        # Two epochs of every consumer: each kept key shows up, no held-out one does.
        seen += _keys(build_loader(cfg, rank, 2, seed=3), len(kept))
    assert set(seen) == kept


def test_dataloader_workers_leave_the_share_out(corpus):
    held = _expected_held(corpus.keys, SHARE)
    cfg = _cfg(corpus.pattern, num_workers=2, worker_start_method="fork")
    seen = _keys(build_loader(cfg, 0, 1, seed=3), 24)
    assert set(seen) == set(corpus.keys) - held


def test_resume_continues_without_the_share_and_refuses_another_one(corpus):
    held = _expected_held(corpus.keys, SHARE)
    cfg = _cfg(corpus.pattern)
    first = build_loader(cfg, 1, 2, seed=3)
    before = _keys(first, 3)
    state = first.state_dict()
    assert state["val_holdout"] == SHARE
    after = _keys(build_loader(cfg, 1, 2, seed=3, state=state), 12)
    uninterrupted = _keys(build_loader(cfg, 1, 2, seed=3), 15)
    assert before + after == uninterrupted
    assert not held & set(before + after)
    with pytest.raises(ValueError, match="data.val_holdout=0.25 and this run has 0.1"):
        build_loader(_cfg(corpus.pattern, val_holdout=0.1), 1, 2, seed=3, state=state)


def test_a_change_of_world_size_keeps_the_share_out(corpus):
    held = _expected_held(corpus.keys, SHARE)
    cfg = _cfg(corpus.pattern)
    loaders = [build_loader(cfg, rank, 2, seed=3) for rank in range(2)]
    for loader in loaders:
        _keys(loader, 2)
    saved = [loader.state_dict() for loader in loaders]
    resumed = build_loader(cfg, 0, 1, seed=3, state=elastic_loader_state(saved, 0, 1, cfg))
    assert not held & set(_keys(resumed, 20))
    assert resumed.state_dict()["val_holdout"] == SHARE


def test_a_change_of_world_size_refuses_another_share_like_the_same_size_resume(corpus):
    cfg, other = _cfg(corpus.pattern), _cfg(corpus.pattern, val_holdout=0.1)
    loaders = [build_loader(cfg, rank, 2, seed=3) for rank in range(2)]
    for loader in loaders:
        _keys(loader, 1)
    saved = [loader.state_dict() for loader in loaders]
    state = elastic_loader_state(saved, 0, 1, other)
    assert state["val_holdout"] == SHARE  # the saved share, not the new run's
    with pytest.raises(ValueError, match="data.val_holdout=0.25 and this run has 0.1"):
        build_loader(other, 0, 1, seed=3, state=state)
    saved[1] = {**saved[1], "val_holdout": 0.1}
    with pytest.raises(ValueError, match=r"disagree on val_holdout \(0.1 vs 0.25\)"):
        elastic_loader_state(saved, 0, 1, cfg)


def test_the_shard_index_leaves_the_share_out_for_every_plan_built_on_it(corpus):
    held = _expected_held(corpus.keys, SHARE)
    shards = shard_list(corpus.pattern)
    every = [ref.key for shard in shards for ref in ShardIndex().refs(shard)]
    assert sorted(every) == sorted(corpus.keys)
    kept = [ref.key for shard in shards for ref in ShardIndex(SHARE).refs(shard)]
    assert kept == [key for key in every if key not in held]
    # A mix builds its own index from the config: nothing to patch in afterwards.
    cfg = _cfg(
        "",
        sources=[
            SourceConfig("a", f"{corpus.root}/shard-00000[0-3].tar", 1.0),
            SourceConfig("b", f"{corpus.root}/shard-00000[4-7].tar", 1.0),
        ],
    )
    sources = [shard_list(source.shards) for source in cfg.source_list()]
    mixed = ConsumerBatches(cfg, sources, 3, 0, 1, ConsumerPosition(), lambda _: [1.0, 1.0])
    assert sum(plan.epoch_size for plan in mixed.plans) == len(kept)
    seen = [k for batch, _ in itertools.islice(iter(mixed), 20) for k in batch.keys]
    assert set(seen) == set(kept)


def test_mixed_sources_leave_the_share_out(corpus):
    held = _expected_held(corpus.keys, SHARE)
    root = corpus.root
    cfg = _cfg(
        "",
        sources=[
            SourceConfig("a", f"{root}/shard-00000[0-3].tar", 1.0),
            SourceConfig("b", f"{root}/shard-00000[4-7].tar", 1.0),
        ],
    )
    seen = _keys(build_loader(cfg, 0, 1, seed=3), 40)
    assert set(seen) == set(corpus.keys) - held


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"data.val_holdout=1.0: give the held-out share"):
        DataConfig(shards="x", val_holdout=1.0).validate()
