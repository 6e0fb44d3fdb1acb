"""End to end in precomputed mode: shard the sample corpus, encode it (VAE latents, text
embeddings, audio features), train on the encoded shards, and check the trainer's loss never
calls a frozen encoder yet equals the loss of the same windows encoded on the fly."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.encode import EncodeConfig, run_encode
from data_pipelines.testing import build_sample_shards, shard_members
from omni_train.data.batch import Batch, collate
from omni_train.testing import compose_train_config, run_ranks, train_in_rank

pytestmark = pytest.mark.slow

SEED = 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(raw data dir, encoded dir) of the 4-clip sample corpus."""
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=4, seed=0)
    encoded = tmp_path_factory.mktemp("encoded")
    cfg = EncodeConfig(input_dir=str(data), output_dir=str(encoded), seed=SEED, audio_features=True)
    stats = run_encode(cfg, ["experiment=smoke"])
    assert stats["encoded"] >= 4 and stats["rejected"] == 0
    return data, encoded


def _overrides(run_dir: Path, encoded: Path, max_steps: int) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={encoded / 'shards' / '*.tar'}",
        "data.precomputed=true",
        f"trainer.max_steps={max_steps}",
        "trainer.save_every=100",
        "logger.wandb.enabled=false",
        "diffusion.sampling_steps=2",
        "curriculum.stages.0.ratios.audio=1.0",
        "curriculum.stages.0.ratios.pose=1.0",
    ]


def test_training_on_encoded_shards_gives_finite_losses(corpus, tmp_path):
    _, encoded = corpus
    assert run_ranks(train_in_rank, 1, _overrides(tmp_path, encoded, 3)) == [3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def _raw_batch(data: Path, precomputed: Batch, data_cfg) -> Batch:
    """The precomputed batch's windows decoded and left for the encoders, as raw mode would."""
    from omni_train.data.decode import decode_sample

    members = shard_members(data)
    samples = []
    for key in precomputed.keys:
        # The encode stage's own window choice for this key.
        rng = np.random.default_rng([SEED, zlib.crc32(key.encode("utf-8"))])
        samples.append(decode_sample({"__key__": key, **members[key]}, data_cfg, rng))
    raw = collate(samples)
    assert not raw.precomputed
    # Keypoints are metadata (stored rounded in the json), not an encoder's output.
    return dataclasses.replace(raw, keypoints=precomputed.keypoints)


def test_precomputed_batch_skips_the_encoders_and_matches_on_the_fly_loss(
    corpus, tmp_path, monkeypatch
):
    from omni_train.data import build_loader
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import FrozenEncoders, build_frozen_encoders
    from omni_train.trainer.step import compute_loss

    data, encoded = corpus
    cfg, _ = compose_train_config(_overrides(tmp_path, encoded, 3))
    batch = next(iter(build_loader(cfg.data, 0, 1, seed=0)))
    assert batch.precomputed
    stored = (batch.latents, batch.ref_latents, batch.audio_features, batch.text_embeddings)
    assert all(tensor is not None for tensor in stored)
    assert batch.text_mask.any(dim=1).all()

    torch.manual_seed(SEED)  # the encode stage's random-init frozen weights
    encoders = build_frozen_encoders(cfg.model).eval()
    torch.manual_seed(1)
    denoiser = build_denoiser(cfg.model)
    size = len(batch.keys)
    masks = {c: np.ones(size, bool) for c in ("text", "ref", "audio", "pose")}

    def loss_of(b):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return compute_loss(
                denoiser, encoders, b, masks, 1, cfg.diffusion, generator, torch.device("cpu")
            ).per_sample

    raw_batch = _raw_batch(data, batch, cfg.data)
    on_the_fly = loss_of(raw_batch)

    def forbidden(*args, **kwargs):
        raise AssertionError("a frozen encoder ran on a precomputed batch")

    for name in ("encode_video", "encode_text", "encode_audio"):
        monkeypatch.setattr(FrozenEncoders, name, forbidden)
    precomputed = loss_of(batch)
    assert torch.isfinite(precomputed).all()
    with pytest.raises(AssertionError, match="frozen encoder"):
        loss_of(raw_batch)
    # Same windows, weights and noise: equal up to float noise of batch-size-dependent kernels.
    torch.testing.assert_close(precomputed, on_the_fly, rtol=1e-4, atol=1e-5)
