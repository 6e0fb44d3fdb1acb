"""Cost-aware buckets: batch size per bucket from a FLOPs budget, and buckets in step on every
rank (data.sync_buckets)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

from omni_train.data import DataConfig, build_loader
from omni_train.data.bucket_cost import (
    bucket_costs,
    cost_batch_sizes,
    resolve_budget,
    step_time_spread,
    with_cost_batch_sizes,
)
from omni_train.data.bucket_sync import SyncedConsumerBatches
from omni_train.data.config import BucketConfig, SourceConfig
from omni_train.data.consumer import SourceSchedule, source_seed
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.plan import ConsumerPlan
from omni_train.data.shards import shard_list
from omni_train.data.state import ConsumerPosition
from omni_train.describe import model_preset
from omni_train.models.flops import train_flops_per_sample

# ----------------------------------------------------------------------------- batch sizes
THREE_BUCKETS = [
    BucketConfig([256, 256], 33, 4),
    BucketConfig([320, 192], 65, 4),
    BucketConfig([512, 512], 17, 4),
]


def _latent_tokens(bucket: BucketConfig, stride: int = 16) -> int:
    height, width = bucket.resolution
    return (1 + (bucket.num_frames - 1) // 4) * (height // stride) * (width // stride)


def test_batch_sizes_from_a_budget_of_linear_and_attention_work():
    # cost = tokens x width + tokens^2 at width 64, tokens = latent frames x (h/16) x (w/16):
    #   256x256x33:  9 x 16 x 16 = 2304 tokens -> 2304 x 64 + 2304^2 =  5,455,872
    #   320x192x65: 17 x 20 x 12 = 4080 tokens -> 4080 x 64 + 4080^2 = 16,907,520
    #   512x512x17:  5 x 32 x 32 = 5120 tokens -> 5120 x 64 + 5120^2 = 26,542,080
    # "auto": the costliest (512x512) at batch 4 = 106,168,320 ->
    #   floor(106,168,320 / 5,455,872) = 19, floor(/ 16,907,520) = 6, 4.
    def cost(_model, resolution, num_frames):
        tokens = _latent_tokens(BucketConfig(list(resolution), num_frames))
        return tokens * 64 + tokens**2

    costs = bucket_costs(None, THREE_BUCKETS, cost)
    assert costs == [5_455_872, 16_907_520, 26_542_080]
    budget = resolve_budget("auto", THREE_BUCKETS, costs)
    assert budget == 106_168_320
    assert cost_batch_sizes(THREE_BUCKETS, costs, budget) == [19, 6, 4]
    # Only the costliest bucket's batch size sets "auto": 32 x 5,455,872 does not.
    cheap_first = [replace(THREE_BUCKETS[0], batch_size=32), *THREE_BUCKETS[1:]]
    assert resolve_budget("auto", cheap_first, costs) == 106_168_320
    # A budget given in FLOPs: 50,000,000 -> 9, 2, 1; capped at 8 -> 8, 2, 1.
    given = resolve_budget("5e7", THREE_BUCKETS, costs)
    assert cost_batch_sizes(THREE_BUCKETS, costs, given) == [9, 2, 1]
    assert cost_batch_sizes(THREE_BUCKETS, costs, 5e7, max_batch_size=8) == [8, 2, 1]


def test_batch_sizes_of_the_mmdit_count_its_attention():
    # The `small` preset's training FLOPs per sample (flops.train_flops_per_sample, 64 text
    # tokens): 257,656,487,936 / 581,562,040,320 / 1,004,813,549,568, of which joint attention
    # is 49 % / 61 % / 71 %. Budget "auto" = 4 x 1,004,813,549,568 = 4,019,254,198,272:
    # floor(4,019,254,198,272 / 257,656,487,936) = 15, floor(/ 581,562,040,320) = 6, 4.
    # (Without the attention term the costs would be 130.9 / 227.6 / 294.9 GFLOP: 9, 5, 4.)
    small = model_preset("small")
    expected_costs = [
        train_flops_per_sample(small, b.resolution, b.num_frames) for b in THREE_BUCKETS
    ]
    assert expected_costs == [257_656_487_936, 581_562_040_320, 1_004_813_549_568]
    assert bucket_costs(small, THREE_BUCKETS) == expected_costs
    cfg = DataConfig(shards="x", buckets=THREE_BUCKETS, batch_by_cost=True)
    sized = with_cost_batch_sizes(cfg, small)
    assert [b.batch_size for b in sized.buckets] == [15, 6, 4]
    assert [b.batch_size for b in cfg.buckets] == [4, 4, 4]  # the config itself is untouched
    capped = with_cost_batch_sizes(replace(cfg, cost_max_batch_size=8), small)
    assert [b.batch_size for b in capped.buckets] == [8, 6, 4]


def test_a_plain_config_gets_its_batch_size_and_stays_plain():
    small = model_preset("small")
    one = BucketConfig([256, 256], 33, 4)
    cfg = DataConfig(
        shards="x", resolution=[256, 256], num_frames=33, batch_by_cost=True, cost_budget="1.1e12"
    )
    sized = with_cost_batch_sizes(cfg, small)
    assert sized.batch_size == 1_100_000_000_000 // bucket_costs(small, [one])[0] == 4
    assert not sized.mixed and sized.buckets == []
    with pytest.raises(ValueError, match=r"data.resolution / data.num_frames \(256x256, 33"):
        with_cost_batch_sizes(replace(cfg, cost_budget="1e11"), small)


def test_off_by_default_and_the_config_is_returned_as_it_is():
    cfg = DataConfig(shards="x", buckets=THREE_BUCKETS)
    assert not cfg.batch_by_cost and not cfg.sync_buckets
    assert with_cost_batch_sizes(cfg, None) is cfg


def test_a_bucket_over_the_budget_is_named():
    small = model_preset("small")
    cfg = DataConfig(shards="x", buckets=THREE_BUCKETS, batch_by_cost=True, cost_budget="6e11")
    with pytest.raises(ValueError) as caught:
        with_cost_batch_sizes(cfg, small)
    message = str(caught.value)
    assert "data.buckets.2 (512x512, 17 frames)" in message
    assert "1.005e+12 training FLOPs per sample" in message and "raise data.cost_budget" in message


def test_a_bucket_the_model_cannot_patch_is_named():
    buckets = [*THREE_BUCKETS, BucketConfig([100, 64], 9, 1)]
    cfg = DataConfig(shards="x", buckets=buckets, batch_by_cost=True)
    with pytest.raises(ValueError, match=r"data.buckets.3 \(100x64, 9 frames\): resolution"):
        with_cost_batch_sizes(cfg, model_preset("small"))


@pytest.mark.parametrize("budget", ["", "lots", "0", "-1e12", "nan", "inf"])
def test_a_bad_budget_is_refused_naming_the_field(budget):
    cfg = DataConfig(shards="x", batch_by_cost=True, cost_budget=budget)
    with pytest.raises(ValueError, match="data.cost_budget=.*training FLOPs per rank batch"):
        cfg.validate()


def test_batch_by_cost_without_the_model_config_says_how_to_pass_it():
    cfg = DataConfig(shards="x", buckets=THREE_BUCKETS, batch_by_cost=True)
    with pytest.raises(ValueError, match=r"model_cfg=cfg.model"):
        with_cost_batch_sizes(cfg, None)


def test_step_time_spread():
    assert step_time_spread([0.2, 0.5, 0.4]) == 2.5
    with pytest.raises(ValueError):
        step_time_spread([0.0, 1.0])


# ----------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory, media) -> SimpleNamespace:
    """Source "land": 32x24 clips of 16 frames; source "tall": 24x32 clips, every third of
    24 frames, the others of 16; 2 shards of 6 clips each. (Every other clip of 24 frames
    would give one of 2 consumers, dealt every other sample, all the long ones.)"""
    root = tmp_path_factory.mktemp("bucket_cost")
    for shard in range(2):
        land = [media.make_sample(f"land_{shard}_{i}.mp4") for i in range(6)]
        tall = [
            media.make_sample(
                f"tall_{shard}_{i}.mp4", num_frames=24 if i % 3 == 1 else 16, height=32, width=24
            )
            for i in range(6)
        ]
        media.write_shard(root / "land" / f"shard-{shard:06d}.tar", land)
        media.write_shard(root / "tall" / f"shard-{shard:06d}.tar", tall)
    return SimpleNamespace(root=root)


# Sides a multiple of 16 (the tiny model's VAE stride x patch), so their costs can be counted.
BUCKETS = [
    BucketConfig([16, 32], 9, 2),  # landscape
    BucketConfig([32, 16], 9, 3),  # portrait, short
    BucketConfig([32, 16], 17, 1),  # portrait, long: only the 24-frame clips fit
]
# (frames, height, width) of a batch -> its bucket
BUCKET_OF_SHAPE = {(b.num_frames, *b.resolution): i for i, b in enumerate(BUCKETS)}


def _cfg(corpus, **overrides) -> DataConfig:
    base = dict(
        sources=[
            SourceConfig("land", str(corpus.root / "land" / "*.tar"), 1.0),
            SourceConfig("tall", str(corpus.root / "tall" / "*.tar"), 1.0),
        ],
        buckets=BUCKETS,
        resolution=[16, 16],
        num_frames=9,
        fps=8.0,
        shuffle_buffer=3,
        split="sample",
        worker_start_method="fork",
    )
    return DataConfig(**{**base, **overrides})


def _take(loader, count: int) -> list:
    return list(itertools.islice(iter(loader), count))


def _buckets(batches) -> list[int]:
    return [BUCKET_OF_SHAPE[tuple(batch.video.shape[2:])] for batch in batches]


def test_without_sync_ranks_run_different_buckets_at_a_step(mix_corpus):
    """The default: each rank hands out whichever bucket fills first on it."""
    cfg = _cfg(mix_corpus)
    ranks = [_buckets(_take(build_loader(cfg, rank, 2, seed=4), 10)) for rank in range(2)]
    assert ranks[0] != ranks[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_with_sync_every_rank_runs_the_same_bucket_at_every_batch(mix_corpus, num_workers):
    cfg = _cfg(mix_corpus, sync_buckets=True, num_workers=num_workers)
    ranks = []
    for rank in range(2):
        batches = _take(build_loader(cfg, rank, 2, seed=4), 16)
        for batch in batches:  # whole batches of one bucket at its batch size
            bucket = BUCKETS[BUCKET_OF_SHAPE[tuple(batch.video.shape[2:])]]
            assert len(batch.keys) == bucket.batch_size
        ranks.append(_buckets(batches))
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == {0, 1, 2}


def test_with_sync_the_bucket_of_a_batch_does_not_depend_on_the_layout(mix_corpus):
    """Rank batch n has the same bucket on 1 rank, 2 ranks or 2 workers: only seed and n."""
    one = _buckets(_take(build_loader(_cfg(mix_corpus, sync_buckets=True), 0, 1, seed=7), 12))
    workers = _cfg(mix_corpus, sync_buckets=True, num_workers=2)
    assert _buckets(_take(build_loader(workers, 1, 2, seed=7), 12)) == one


def test_with_sync_and_costs_every_rank_runs_the_cost_batch_sizes(mix_corpus):
    # The `tiny` preset's training FLOPs per sample: 78,246,912 for both 9-frame buckets and
    # 120,163,328 for the 17-frame one; "auto" = 4 x 120,163,328 = 480,653,312, so
    # floor(480,653,312 / 78,246,912) = 6 for the 9-frame buckets and 4 for the 17-frame one.
    cfg = _cfg(mix_corpus, sync_buckets=True, batch_by_cost=True)
    cfg.buckets = [replace(b, batch_size=n) for b, n in zip(BUCKETS, [2, 3, 4], strict=True)]
    ranks = []
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=4, model_cfg=model_preset("tiny"))
        assert [b.batch_size for b in loader.cfg.buckets] == [6, 6, 4]
        batches = _take(loader, 8)
        sizes = [len(batch.keys) for batch in batches]
        ranks.append(list(zip(_buckets(batches), sizes, strict=True)))
    assert ranks[0] == ranks[1]
    assert {size for _, size in ranks[0]} == {6, 4}
    assert all(size == (4 if bucket == 2 else 6) for bucket, size in ranks[0])


def test_with_sync_buckets_come_up_at_the_rate_the_data_fills_them(mix_corpus):
    # Pilot clips: half land (bucket 0), half tall, of which 2/3 are 16-frame (bucket 1) and
    # 1/3 24-frame (bucket 2): shares 1/2, 1/3, 1/6. A consumer fills batches of 2, 3, 1 at
    # the rates 1/4, 1/9, 1/6, so the draws go 9/19, 4/19, 6/19 = 0.474, 0.211, 0.316 (taking
    # every pilot's bucket would give 0.5, 0.333, 0.167). 3000 draws: 1 sigma <= 0.0092.
    cfg = _cfg(mix_corpus, sync_buckets=True)
    sources = [shard_list(source.shards) for source in cfg.sources]
    schedule = SourceSchedule(["land", "tall"], [1.0, 1.0])
    stream = SyncedConsumerBatches(cfg, sources, 4, 0, 1, ConsumerPosition(), schedule)
    draws = Counter(stream.rank_batch_bucket(n) for n in range(3000))
    shares = [draws[i] / 3000 for i in range(3)]
    assert shares == pytest.approx([9 / 19, 4 / 19, 6 / 19], abs=0.035)


@pytest.mark.parametrize("consumed", [3, 6])
def test_with_sync_resume_is_exact(mix_corpus, consumed):
    cfg = _cfg(mix_corpus, sync_buckets=True)
    straight = _take(build_loader(cfg, 1, 2, seed=4), consumed + 5)
    first = build_loader(cfg, 1, 2, seed=4)
    _take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))
    assert any(w["pending"] for w in state["workers"])  # clips waiting for their bucket
    resumed = _take(build_loader(cfg, 1, 2, seed=4, state=state), 5)
    assert [b.keys for b in resumed] == [b.keys for b in straight[consumed:]]
    assert all(
        r.video.shape == s.video.shape for r, s in zip(resumed, straight[consumed:], strict=True)
    )


def test_with_sync_a_change_of_world_size_hands_out_the_waiting_clips_in_step(mix_corpus):
    """2 ranks -> 1 rank with 2 workers: the clips the old ranks had waiting for their bucket
    are handed out, and rank batch n keeps the bucket it has on any layout."""
    cfg = _cfg(mix_corpus, sync_buckets=True)
    states, waiting = [], set()
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, seed=4)
        _take(loader, 3)
        states.append(json.loads(json.dumps(loader.state_dict())))
        for source, raw in states[-1]["workers"][0]["pending"]:
            shards = shard_list(cfg.sources[source].shards)
            plan = ConsumerPlan(shards, source_seed(4, source), 3, rank, 2, split="sample")
            waiting.add(plan.refs_at([raw])[0][1].key)
    assert waiting
    new_cfg = _cfg(mix_corpus, sync_buckets=True, num_workers=2)
    state = elastic_loader_state(states, 0, 1, new_cfg)
    after = _take(build_loader(new_cfg, 0, 1, seed=4, state=state), 40)
    assert waiting <= {key for batch in after for key in batch.keys}
    uninterrupted = _take(build_loader(cfg, 0, 1, seed=4), 43)
    assert _buckets(after) == _buckets(uninterrupted)[3:]


def test_with_sync_a_consumer_without_clips_of_the_drawn_bucket_fails_naming_it(mix_corpus):
    # data.split=shard: rank 0 owns the landscape shard only, rank 1 the portrait one.
    shards = f"{mix_corpus.root}/land/shard-000000.tar,{mix_corpus.root}/tall/shard-000000.tar"
    cfg = _cfg(mix_corpus, sources=[], shards=shards, split="shard", sync_buckets=True)
    cfg.buckets = BUCKETS[:2]
    with pytest.raises(RuntimeError) as caught:
        _take(build_loader(cfg, 0, 2, seed=4), 20)
    message = str(caught.value)
    assert "data.buckets.1 (32x16, 9 frames)" in message and "data.split=sample" in message
