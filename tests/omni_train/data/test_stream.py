from __future__ import annotations

import itertools
import json
import pickle
from collections import Counter

import pytest
import torch

from omni_train.data import DataConfig, build_loader, shard_list
from omni_train.data import consumer as consumer_module
from omni_train.data.batch import Batch


def _cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(
        shards=pattern, resolution=[16, 16], num_frames=9, fps=8.0, batch_size=2, shuffle_buffer=4
    )
    return DataConfig(**{**base, **overrides})


def _take(loader, n: int) -> list[Batch]:
    return list(itertools.islice(iter(loader), n))


def _corrupt_counts(loader, n: int) -> list[int]:
    """The loader's count of skipped samples after each of its next ``n`` batches."""
    return [loader.corrupt_skipped for _ in itertools.islice(iter(loader), n)]


def _keys(batches: list[Batch]) -> list[str]:
    return [key for batch in batches for key in batch.keys]


# ----------------------------------------------------------------------------- shard lists
def test_shard_list_is_sorted_and_expands_commas_and_braces(corpus):
    root = corpus.root
    everything = shard_list(corpus.pattern)
    assert everything == sorted(everything) and len(everything) == 8
    braces = shard_list(f"{root}/shard-00000{{3..4}}.tar,{root}/shard-00000{{0,7}}.tar")
    assert [p.rsplit("-", 1)[1] for p in braces] == [f"00000{i}.tar" for i in (0, 3, 4, 7)]


def test_shard_list_names_the_pattern_that_matches_nothing(corpus):
    with pytest.raises(ValueError, match="nowhere/\\*.tar"):
        shard_list(f"{corpus.pattern},nowhere/*.tar")
    with pytest.raises(ValueError, match="data.shards is empty"):
        build_loader(_cfg(""), 0, 1, 0)


def test_invalid_num_frames_is_rejected_with_the_rule(corpus):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        build_loader(_cfg(corpus.pattern, num_frames=8), 0, 1, 0)


def test_too_few_shards_for_whole_shard_split_fails_fast_with_a_fix(corpus):
    with pytest.raises(ValueError) as caught:
        build_loader(_cfg(corpus.pattern, num_workers=4, split="shard"), 0, 4, 0)
    message = str(caught.value)
    for part in ("8 shard", "16 data consumers", "data.split=sample", "num_workers"):
        assert part in message


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (3, 0)])
def test_fewer_shards_than_consumers_split_by_sample(media, tmp_path, world_size, num_workers):
    # 2 shards of 10 samples for 16 (or 3) consumers: every sample once per epoch, no hang.
    samples = [media.make_sample(f"few{i}.mp4", num_frames=10) for i in range(20)]
    media.write_shard(tmp_path / "shard-000000.tar", samples[:10])
    media.write_shard(tmp_path / "shard-000001.tar", samples[10:])
    cfg = _cfg(str(tmp_path / "*.tar"), num_workers=num_workers, batch_size=1)
    seen = []
    consumers = world_size * max(1, num_workers)
    for rank in range(world_size):
        loader = build_loader(cfg, rank, world_size, seed=0)
        per_worker = [len(range(c, 20, consumers)) for c in range(consumers)]
        mine = per_worker[rank * max(1, num_workers) : (rank + 1) * max(1, num_workers)]
        if num_workers == 0 or len(set(mine)) == 1:
            seen += _keys(_take(loader, sum(mine)))
        else:  # uneven workers: count each worker's first epoch from the round robin
            batches = _take(loader, max(mine) * len(mine))
            for worker, size in enumerate(mine):
                seen += _keys(batches[worker :: len(mine)][:size])
    assert Counter(seen) == Counter(s["__key__"] for s in samples)
    with pytest.raises(ValueError, match="20 sample\\(s\\) for 24 data consumers"):
        build_loader(_cfg(str(tmp_path / "*.tar"), num_workers=4), 0, 6, seed=0)


# ----------------------------------------------------------------------------- batches
def test_batch_layout(corpus):
    loader = build_loader(_cfg(corpus.pattern, batch_size=3), 0, 1, 0)
    (batch,) = _take(loader, 1)
    assert not batch.precomputed and batch.latents is None and batch.text_embeddings is None
    assert batch.video.shape == (3, 3, 9, 16, 16)
    assert batch.ref.shape == (3, 3, 16, 16)
    assert batch.audio.shape == (3, 18_000)
    assert batch.keypoints.shape == (3, 9, 17, 3)
    assert batch.has_audio.dtype == torch.bool and batch.has_audio.shape == (3,)
    assert len(batch.keys) == len(batch.captions) == len(batch.quality) == 3
    assert loader.corrupt_skipped == 0


def test_same_seed_same_stream_other_seed_other_order(corpus):
    first = _keys(_take(build_loader(_cfg(corpus.pattern), 0, 1, seed=7), 6))
    again = _keys(_take(build_loader(_cfg(corpus.pattern), 0, 1, seed=7), 6))
    other = _keys(_take(build_loader(_cfg(corpus.pattern), 0, 1, seed=8), 6))
    assert first == again and first != other


def test_every_sample_once_per_epoch_across_ranks_and_workers(corpus):
    # 2 ranks x 2 workers = 4 consumers, 2 shards x 3 samples each: 3 batches per worker.
    epochs = [[], []]
    for rank in (0, 1):
        loader = build_loader(_cfg(corpus.pattern, num_workers=2), rank, 2, seed=0)
        batches = _take(loader, 12)
        epochs[0] += _keys(batches[:6])
        epochs[1] += _keys(batches[6:])
    for keys in epochs:
        assert Counter(keys) == Counter(corpus.keys)
    assert epochs[0] != epochs[1]  # reshuffled each epoch


@pytest.mark.parametrize(("num_workers", "consumed"), [(0, 13), (2, 3), (2, 8)])
def test_resume_continues_exactly_where_an_uninterrupted_run_would(corpus, num_workers, consumed):
    cfg = _cfg(corpus.pattern, num_workers=num_workers)
    uninterrupted = _take(build_loader(cfg, 0, 2 if num_workers else 1, seed=3), consumed + 4)

    world_size = 2 if num_workers else 1
    first = build_loader(cfg, 0, world_size, seed=3)
    assert _keys(_take(first, consumed)) == _keys(uninterrupted[:consumed])
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = _take(build_loader(cfg, 0, world_size, seed=3, state=state), 4)

    assert _keys(resumed) == _keys(uninterrupted[consumed:])
    assert torch.equal(resumed[0].video, uninterrupted[consumed].video)
    assert torch.equal(resumed[-1].audio, uninterrupted[-1].audio)


def test_a_new_iter_continues_from_the_last_batch(corpus):
    loader = build_loader(_cfg(corpus.pattern), 0, 1, seed=0)
    straight = _keys(_take(build_loader(_cfg(corpus.pattern), 0, 1, seed=0), 4))
    assert _keys(_take(loader, 1) + _take(loader, 3)) == straight


def test_resume_fast_forwards_without_decoding_or_reading_payloads(corpus, monkeypatch):
    cfg = _cfg(corpus.pattern)
    first = build_loader(cfg, 0, 1, seed=0)
    _take(first, 20)  # 40 samples: past one 24-sample epoch
    calls = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        consumer_module, "decode_sample", counting("decode", consumer_module.decode_sample)
    )
    monkeypatch.setattr(
        consumer_module, "read_sample", counting("read", consumer_module.read_sample)
    )
    _take(build_loader(cfg, 0, 1, seed=0, state=first.state_dict()), 1)
    assert calls == {"decode": 2, "read": 2}


def test_state_from_another_setup_is_refused_with_the_reason(corpus):
    loader = build_loader(_cfg(corpus.pattern, num_workers=2), 0, 2, seed=0)
    _take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(_cfg(corpus.pattern, num_workers=0), 0, 2, seed=0, state=state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(_cfg(corpus.pattern, num_workers=2), 0, 2, seed=1, state=state)


# ----------------------------------------------------------------------------- hostile shards
class _CreatesFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(media, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFileWhenUnpickled(str(marker)))
    # The payload is live: unpickling it does create the marker, so the check below can fail.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    samples = [media.make_sample(f"p{i}.mp4") for i in range(3)]
    for sample in samples:
        sample.update(pyd=payload, pickle=payload)
    media.write_shard(tmp_path / "shard-000000.tar", samples)
    batches = _take(build_loader(_cfg(str(tmp_path / "*.tar"), batch_size=3), 0, 1, 0), 2)
    assert sorted(batches[0].keys) == sorted(s["__key__"] for s in samples)
    assert not marker.exists()


def test_corrupt_samples_are_skipped_counted_and_resumed_exactly(media, tmp_path):
    good = [media.make_sample(f"g{i}.mp4") for i in range(5)]
    broken = media.make_sample("broken.mp4")
    broken["mp4"] = b"\x00" * 300
    media.write_shard(tmp_path / "shard-000000.tar", good[:2] + [broken] + good[2:3])
    media.write_shard(tmp_path / "shard-000001.tar", good[3:])
    cfg = _cfg(str(tmp_path / "*.tar"))

    counts = _corrupt_counts(build_loader(cfg, 0, 1, seed=0), 5)
    batches = _take(build_loader(cfg, 0, 1, seed=0), 5)  # 10 samples: two epochs of 5
    assert Counter(_keys(batches)) == Counter({s["__key__"]: 2 for s in good})
    assert counts[-1] == 2
    assert broken["__key__"] not in _keys(batches)

    first = build_loader(cfg, 0, 1, seed=0)
    _take(first, 2)
    resumed = build_loader(cfg, 0, 1, seed=0, state=first.state_dict())
    assert _corrupt_counts(resumed, 3) == counts[2:]
    resumed = _take(build_loader(cfg, 0, 1, seed=0, state=first.state_dict()), 3)
    assert _keys(resumed) == _keys(batches[2:])


def test_shards_where_nothing_decodes_raise_instead_of_spinning(media, tmp_path):
    broken = media.make_sample("only.mp4")
    broken["mp4"] = b"garbage"
    media.write_shard(tmp_path / "shard-000000.tar", [broken])
    with pytest.raises(RuntimeError, match="no sample of shards"):
        _take(build_loader(_cfg(str(tmp_path / "*.tar")), 0, 1, 0), 1)


@pytest.mark.slow
def test_spawned_workers_give_the_same_batches(corpus):
    default = _keys(_take(build_loader(_cfg(corpus.pattern, num_workers=2), 0, 1, 0), 3))
    spawned = build_loader(
        _cfg(corpus.pattern, num_workers=2, worker_start_method="spawn"), 0, 1, 0
    )
    assert _keys(_take(spawned, 3)) == default


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_outlive_the_stop_signals_slurm_sends_to_every_process(corpus, start_method):
    import os
    import signal
    import subprocess
    from pathlib import Path

    cfg = _cfg(corpus.pattern, num_workers=2, worker_start_method=start_method)
    want = _keys(_take(build_loader(cfg, 0, 1, 0), 4))
    batches = iter(build_loader(cfg, 0, 1, 0))
    got = _keys([next(batches)])
    children = subprocess.run(
        ["pgrep", "-P", str(os.getpid())], capture_output=True, text=True
    ).stdout.split()
    # Spawned workers share the parent with multiprocessing's resource tracker: not a worker.
    workers = [
        int(pid)
        for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2, children
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(pid, sig)
    got += _keys([next(batches) for _ in range(3)])
    assert got == want
