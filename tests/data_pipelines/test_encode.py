from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.encode import EncodeConfig, run_encode, training_config
from data_pipelines.testing import read_jsonl, shard_members

pytestmark = pytest.mark.slow
OVERRIDES = ["experiment=smoke"]


@pytest.fixture(scope="module")
def encoded(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded")
    cfg = EncodeConfig(input_dir=str(sample.data), output_dir=str(out), audio_features=True)
    return cfg, run_encode(cfg, OVERRIDES)


def test_encoded_shards_feed_the_precomputed_loader(sample, encoded, tmp_path):
    from omni_train.data.latents import decode_latent_sample

    cfg, stats = encoded
    data = training_config([*OVERRIDES, f"run_dir={tmp_path}"]).data
    members = shard_members(cfg.output_dir)
    assert sorted(members) == sorted(
        row["key"] for row in read_jsonl(sample.data / "manifest.jsonl")
    )
    assert stats == {"shards": 2, "encoded": len(members), "rejected": 0}
    for key, raw in members.items():
        sample_ = decode_latent_sample({"__key__": key, **raw}, data)
        latents, ref = sample_["latents"], sample_["ref_latents"]
        assert latents.ndim == 4 and latents.shape[1] == 1 + (data.num_frames - 1) // 4
        assert ref.shape[:2] == (latents.shape[0], 1) and ref.shape[2:] == latents.shape[2:]
        assert sample_["keypoints"].shape == (data.num_frames, 17, 3)
        meta = json.loads(raw["json"])
        assert meta["num_frames"] == data.num_frames and meta["encoded"]["source_shard"]
        assert sample_["has_audio"] and raw["audio_features.npy"][:6] == b"\x93NUMPY"
        assert not any(payload[:1] == b"\x80" for payload in raw.values())  # no pickle
        assert np.isfinite(latents.numpy()).all()
        text = sample_["text_embeddings"]
        assert text.dtype == torch.float32 and text.ndim == 2 and len(text) > 0
        assert np.isfinite(text.numpy()).all()


def test_text_embeddings_are_the_encoders_valid_tokens(encoded):
    from omni_train.models.encoders import build_frozen_encoders

    cfg, _ = encoded
    train_cfg = training_config([*OVERRIDES, f"run_dir={cfg.output_dir}"])
    torch.manual_seed(cfg.seed)  # the encode stage's random-init weights
    encoders = build_frozen_encoders(train_cfg.model).eval()
    members = shard_members(cfg.output_dir)
    keys = sorted(members)
    captions = [json.loads(members[key]["json"])["caption"] for key in keys]
    padded, mask = encoders.encode_text(captions)
    assert not mask.all()  # captions of different lengths: padding was stripped per sample
    for i, key in enumerate(keys):
        stored = np.load(io.BytesIO(members[key]["text_embeddings.npy"]), allow_pickle=False)
        expected = padded[i][mask[i]].numpy()
        assert stored.shape == expected.shape
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_text_embeddings_can_be_left_out(sample, tmp_path):
    cfg = EncodeConfig(input_dir=str(sample.data), output_dir=str(tmp_path),
                       text_embeddings=False)  # fmt: skip
    run_encode(cfg, OVERRIDES)
    members = shard_members(tmp_path)
    assert members and not any("text_embeddings.npy" in raw for raw in members.values())


def test_encode_resumes_and_is_deterministic(encoded):
    cfg, stats = encoded
    out_dir = Path(cfg.output_dir)
    first = {p.name: p.read_bytes() for p in sorted((out_dir / "shards").glob("*.tar"))}
    mtimes = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    assert run_encode(cfg, OVERRIDES) == stats  # nothing to do
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()} == mtimes
    (out_dir / "shards" / "shard-000000.tar").unlink()
    assert run_encode(cfg, OVERRIDES) == stats  # rebuilt, byte for byte
    assert {p.name: p.read_bytes() for p in sorted((out_dir / "shards").glob("*.tar"))} == first
