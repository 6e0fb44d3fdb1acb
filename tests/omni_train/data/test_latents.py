"""Precomputed-latent mode: arrays from the shards, no video decoding, nothing unpickled."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from omni_train.data import DataConfig, build_loader
from omni_train.data import consumer as consumer_module
from omni_train.data.batch import pad_text


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def _latent_sample(media, name: str, index: int, audio: bool = True) -> dict:
    key = media.clip_key(name)
    sample = {
        "__key__": key,
        "json": media.meta_json(key, 9, 8.0, 16, 16, audio, caption=name),
        "latents.npy": _npy(np.full((4, 3, 2, 2), index, np.float16)),
        "ref_latents.npy": _npy(np.full((4, 2, 2), -index, np.float32)),
    }
    if audio:
        sample["audio.npy"] = _npy(np.full(18_000, 0.25, np.float32))
    return sample


def _cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(shards=pattern, num_frames=9, fps=8.0, batch_size=2, precomputed=True)
    return DataConfig(**{**base, **overrides})


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.fixture()
def latent_shards(media, tmp_path):
    samples = [_latent_sample(media, f"lat{i}.mp4", i, audio=i % 2 == 0) for i in range(6)]
    media.write_shard(tmp_path / "shard-000000.tar", samples[:3])
    media.write_shard(tmp_path / "shard-000001.tar", samples[3:])
    return str(tmp_path / "*.tar"), samples


def test_batches_carry_latents_and_decode_no_video(latent_shards, monkeypatch):
    pattern, samples = latent_shards

    def no_video(*args, **kwargs):
        raise AssertionError("decode_sample called in precomputed mode")

    monkeypatch.setattr(consumer_module, "decode_sample", no_video)
    (batch,) = _take(build_loader(_cfg(pattern, batch_size=3), 0, 1, 0), 1)
    assert batch.precomputed
    assert batch.latents.shape == (3, 4, 3, 2, 2) and batch.latents.dtype.is_floating_point
    assert batch.ref_latents.shape == (3, 4, 1, 2, 2)
    assert batch.audio.shape == (3, 18_000) and batch.keypoints.shape == (3, 9, 17, 3)
    assert batch.video is None and batch.ref is None
    for i, key in enumerate(batch.keys):
        index = [s["__key__"] for s in samples].index(key)
        assert float(batch.latents[i].mean()) == index
        assert float(batch.ref_latents[i].mean()) == -index
        assert bool(batch.has_audio[i]) == (index % 2 == 0)


def test_resume_is_exact_in_precomputed_mode(latent_shards):
    pattern, _ = latent_shards
    cfg = _cfg(pattern)
    straight = _take(build_loader(cfg, 0, 1, seed=2), 7)
    first = build_loader(cfg, 0, 1, seed=2)
    _take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _take(build_loader(cfg, 0, 1, seed=2, state=state), 3)
    assert [b.keys for b in resumed] == [b.keys for b in straight[4:]]


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_object_array_is_refused_and_never_unpickled(media, tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.empty(1, dtype=object)
    hostile[0] = _CreatesFileWhenUnpickled(str(marker))
    payload = _npy(hostile)
    np.load(io.BytesIO(payload), allow_pickle=True)  # live: loading it with pickles does harm
    assert marker.exists()
    marker.unlink()

    good = [_latent_sample(media, f"ok{i}.mp4", i) for i in range(3)]
    bad = _latent_sample(media, "bad.mp4", 9)
    bad["latents.npy"] = payload
    media.write_shard(tmp_path / "shards" / "shard-000000.tar", good[:1] + [bad] + good[1:])
    loader = build_loader(_cfg(str(tmp_path / "shards" / "*.tar"), batch_size=3), 0, 1, 0)
    batches = _take(loader, 1)
    assert sorted(batches[0].keys) == sorted(s["__key__"] for s in good)
    assert loader.corrupt_skipped == 1
    assert not marker.exists()


def test_precomputed_with_buckets_is_refused():
    from omni_train.data.config import BucketConfig

    with pytest.raises(ValueError, match="data.precomputed=true with data.buckets"):
        _cfg("x.tar", buckets=[BucketConfig()]).validate()


def test_text_embeddings_are_padded_to_the_longest_with_a_mask(media, tmp_path):
    samples = [_latent_sample(media, f"txt{i}.mp4", i) for i in range(3)]
    for i, sample in enumerate(samples):  # 1, 3 and 0 (an empty caption) valid tokens
        tokens = [1, 3, 0][i]
        sample["text_embeddings.npy"] = _npy(np.full((tokens, 5), i + 1, np.float16))
    media.write_shard(tmp_path / "shard-000000.tar", samples)
    (batch,) = _take(build_loader(_cfg(str(tmp_path / "*.tar"), batch_size=3), 0, 1, 0), 1)
    assert batch.text_embeddings.shape == (3, 3, 5)
    assert batch.text_embeddings.dtype == torch.float32 and batch.text_mask.dtype == torch.bool
    for i, key in enumerate(batch.keys):
        index = [s["__key__"] for s in samples].index(key)
        tokens = [1, 3, 0][index]
        assert batch.text_mask[i].tolist() == [True] * tokens + [False] * (3 - tokens)
        assert (batch.text_embeddings[i, :tokens] == index + 1).all()
        assert (batch.text_embeddings[i, tokens:] == 0).all()


def test_a_batch_with_text_embeddings_on_some_samples_only_drops_them(media, tmp_path):
    samples = [_latent_sample(media, f"part{i}.mp4", i) for i in range(2)]
    samples[0]["text_embeddings.npy"] = _npy(np.ones((2, 5), np.float32))
    media.write_shard(tmp_path / "shard-000000.tar", samples)
    (batch,) = _take(build_loader(_cfg(str(tmp_path / "*.tar")), 0, 1, 0), 1)
    assert batch.text_embeddings is None and batch.text_mask is None
    assert batch.latents.shape[0] == 2


def test_pad_text_refuses_mixed_widths():
    with pytest.raises(ValueError, match="different widths"):
        pad_text([torch.zeros(2, 4), torch.zeros(2, 5)], ["a", "b"])


def test_a_pickled_text_embedding_is_a_corrupt_sample(media, tmp_path):
    good = [_latent_sample(media, f"tgood{i}.mp4", i) for i in range(2)]
    bad = _latent_sample(media, "tbad.mp4", 7)
    bad["text_embeddings.npy"] = _npy(np.empty(1, dtype=object))
    media.write_shard(tmp_path / "shard-000000.tar", [good[0], bad, good[1]])
    loader = build_loader(_cfg(str(tmp_path / "*.tar")), 0, 1, 0)
    (batch,) = _take(loader, 1)
    assert sorted(batch.keys) == sorted(s["__key__"] for s in good)
    assert loader.corrupt_skipped == 1


def test_a_precomputed_window_is_taken_as_stored(media, tmp_path):
    # Without data.sources / data.buckets no clip length is checked: the window was encoded
    # at its size (here the json says 5 frames, data.num_frames is 9).
    samples = [_latent_sample(media, f"short{i}.mp4", i) for i in range(2)]
    for sample in samples:
        sample["json"] = media.meta_json(sample["__key__"], 5, 8.0, 16, 16, True)
    media.write_shard(tmp_path / "shard-000000.tar", samples)
    loader = build_loader(_cfg(str(tmp_path / "*.tar")), 0, 1, 0)
    (batch,) = _take(loader, 1)
    assert sorted(batch.keys) == sorted(s["__key__"] for s in samples)
    assert loader.corrupt_skipped == 0


def test_a_batch_is_on_one_path_and_moves_and_pickles_whole(latent_shards):
    pattern, _ = latent_shards
    (batch,) = _take(build_loader(_cfg(pattern, batch_size=3), 0, 1, 0), 1)
    moved = batch.to("meta")
    assert moved.latents.device.type == "meta" and moved.has_audio.device.type == "meta"
    assert moved.keys == batch.keys and batch.latents.device.type == "cpu"
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.latents, batch.latents) and copy.precomputed
    with pytest.raises(ValueError, match="either video and ref .* or latents"):
        dataclasses.replace(batch, video=torch.zeros(3, 3, 9, 16, 16))
