"""Exact resume: after SIGKILL on the same layout, and across a change of world size.

How many batches each rank consumes past its save before SIGKILL is drawn from a generator
seeded by the environment variable OMNI_FAULT_SEED (default 0; tests/omni_train/conftest.py);
a failure names the seed, and ``OMNI_FAULT_SEED=N .venv/bin/pytest THIS_FILE`` replays it.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from omni_train.data import DataConfig, build_loader, shard_list
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.plan import ConsumerPlan


def _cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(
        shards=pattern, resolution=[16, 16], num_frames=9, fps=8.0, batch_size=2, shuffle_buffer=4
    )
    return DataConfig(**{**base, **overrides})


def _keys(loader, batches: int) -> list[str]:
    return [k for batch in itertools.islice(iter(loader), batches) for k in batch.keys]


# ----------------------------------------------------------------------------- kill -9
def _train_until_killed(cfg, rank, world_size, save_after, kill_after, state_path, keys_path):
    """Consume batches, 'checkpoint' the loader after ``save_after``, consume up to batch
    ``kill_after`` (the loader's workers prefetch on), then wait for SIGKILL."""
    loader = build_loader(cfg, rank, world_size, seed=11)
    consumed = []
    for count, batch in enumerate(loader, start=1):
        consumed += batch.keys
        if count == save_after:
            tmp = f"{state_path}.tmp"
            with open(tmp, "w") as handle:
                json.dump(loader.state_dict(), handle)
            os.replace(tmp, state_path)
            with open(keys_path, "w") as handle:
                json.dump(consumed, handle)
        if count == kill_after:
            with open(f"{state_path}.waiting", "w") as handle:
                handle.write(str(count))
            while True:
                time.sleep(1)


@pytest.mark.slow
def test_sigkill_then_restart_consumes_the_keys_of_an_uninterrupted_run(
    corpus, tmp_path, fault_rng
):
    cfg = _cfg(corpus.pattern, num_workers=2)
    world_size, save_after, after = 2, 5, 6
    kill_after = save_after + fault_rng.randint(1, 4)
    fault = f"killed after batch {kill_after} ({fault_rng.replay})"
    context = multiprocessing.get_context("fork")
    procs, paths = [], []
    for rank in range(world_size):
        state_path, keys_path = tmp_path / f"loader_rank{rank}.json", tmp_path / f"keys{rank}"
        proc = context.Process(
            target=_train_until_killed,
            args=(cfg, rank, world_size, save_after, kill_after, str(state_path), str(keys_path)),
        )
        proc.start()
        procs.append(proc)
        paths.append((state_path, keys_path))
    waiting = [Path(f"{state_path}.waiting") for state_path, _ in paths]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in waiting):
        assert time.monotonic() < deadline, f"ranks never reached the kill point; {fault}"
        assert all(p.is_alive() for p in procs), f"a rank died before the kill point; {fault}"
        time.sleep(0.05)
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL, fault

    for rank, (state_path, keys_path) in enumerate(paths):
        state = json.loads(state_path.read_text())
        resumed = _keys(build_loader(cfg, rank, world_size, seed=11, state=state), after)
        straight = _keys(build_loader(cfg, rank, world_size, seed=11), save_after + after)
        assert json.loads(keys_path.read_text()) == straight[: 2 * save_after], fault
        assert resumed == straight[2 * save_after :], f"rank {rank}; {fault}"


# ----------------------------------------------------------------------------- new layout
def _run_layout(cfg, world_size, batches, states=None):
    """Every rank's keys over ``batches`` batches and its state_dict afterwards."""
    keys, saved = [], []
    for rank in range(world_size):
        state = None if states is None else elastic_loader_state(states, rank, world_size, cfg)
        loader = build_loader(cfg, rank, world_size, seed=5, state=state)
        keys.append(_keys(loader, batches))
        saved.append(json.loads(json.dumps(loader.state_dict())))
    return keys, saved


def _tail_sizes(cfg, states, world_size):
    consumers = world_size * max(1, cfg.num_workers)
    [handover] = elastic_loader_state(states, 0, world_size, cfg)["handover"]["sources"]
    shards = shard_list(cfg.shards)
    return [
        len(ConsumerPlan(shards, 5, cfg.shuffle_buffer, c, consumers, handover).tail)
        for c in range(consumers)
    ]


@pytest.mark.parametrize(
    ("old_layout", "new_layout"), [((2, 2), (3, 0)), ((1, 0), (2, 2)), ((4, 0), (1, 1))]
)
def test_changed_world_size_finishes_the_epoch_without_repeats_or_skips(
    corpus, old_layout, new_layout
):
    (old_ranks, old_workers), (new_ranks, new_workers) = old_layout, new_layout
    old_cfg = _cfg(corpus.pattern, num_workers=old_workers)
    new_cfg = _cfg(corpus.pattern, num_workers=new_workers)
    # 24 samples; the old layout takes 8 of them (odd batches per worker included).
    before, states = _run_layout(old_cfg, old_ranks, 8 // (2 * old_ranks))
    tails = _tail_sizes(new_cfg, states, new_ranks)
    assert sum(tails) == 24 - 8 and max(tails) - min(tails) <= 1
    # Each new rank reads its consumers' tails first: take whole batches covering them.
    after, _ = _run_layout(new_cfg, new_ranks, 8, states)
    per_rank = max(1, new_workers)
    rest = []
    for rank, keys in enumerate(after):
        rank_tails = tails[rank * per_rank : (rank + 1) * per_rank]
        # Round robin over workers, batch by batch: collect each worker's first tail samples.
        batches = [keys[i : i + 2] for i in range(0, len(keys), 2)]
        for worker, size in enumerate(rank_tails):
            mine = [k for b in batches[worker::per_rank] for k in b]
            rest += mine[:size]
    epoch = [k for keys in before for k in keys] + rest
    assert Counter(epoch) == Counter(corpus.keys)  # every sample once: none skipped or repeated


def test_layout_can_change_twice(corpus):
    cfg2, cfg3 = _cfg(corpus.pattern, num_workers=2), _cfg(corpus.pattern)
    _, first = _run_layout(cfg2, 2, 2)  # 8 samples
    _, second = _run_layout(cfg3, 3, 1, first)  # 6 more, from the tail
    keys, third = _run_layout(cfg2, 1, 5, second)  # 10: the last of the epoch
    tails = _tail_sizes(cfg2, second, 1)
    assert sum(tails) == 24 - 14
    assert third[0]["handover"]["generation"] == 2
    assert third[0]["handover"]["sources"][0]["previous"]["generation"] == 1
    # Resuming the twice-handed-over state on the same layout continues it exactly.
    again = build_loader(cfg2, 0, 1, seed=5, state=third[0])
    straight_state = elastic_loader_state(second, 0, 1, cfg2)
    straight = _keys(build_loader(cfg2, 0, 1, seed=5, state=straight_state), 8)
    assert _keys(again, 3) == straight[10:16]


def test_same_layout_returns_the_rank_state_unchanged(corpus):
    cfg = _cfg(corpus.pattern)
    _, states = _run_layout(cfg, 2, 3)
    assert elastic_loader_state(states, 1, 2, cfg) == states[1]


def test_corrupt_count_carries_over_to_rank_0(corpus):
    cfg = _cfg(corpus.pattern)
    _, states = _run_layout(cfg, 2, 1)
    states[1]["workers"][0]["corrupt"] = 2  # as if two samples had been skipped there
    new = [elastic_loader_state(states, rank, 3, cfg) for rank in range(3)]
    assert [
        build_loader(cfg, r, 3, seed=5, state=s).corrupt_skipped for r, s in enumerate(new)
    ] == [
        2,
        0,
        0,
    ]


def test_incomplete_state_sets_are_refused(corpus):
    cfg = _cfg(corpus.pattern)
    _, states = _run_layout(cfg, 2, 1)
    with pytest.raises(ValueError, match="every loader_rank"):
        elastic_loader_state(states[1:], 0, 3, cfg)
    with pytest.raises(ValueError, match="seed"):
        elastic_loader_state([states[0], {**states[1], "seed": 9}], 0, 3, cfg)
