from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.annotators.lipsync import LipSync
from data_pipelines.annotators.syncnet import SyncNet, mfcc
from data_pipelines.config import TagThresholds, default_annotators
from data_pipelines.tags import audio_tier

pytest.importorskip("cv2")
RATE = 16000


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet.safetensors"
    save_file({k: v.contiguous() for k, v in SyncNet().state_dict().items()}, str(path))
    return path


def _clip(fps: float = 25.0, frames: int = 12) -> ClipView:
    rng = np.random.default_rng(0)
    return ClipView(
        source="x.mp4", path=Path("x.mp4"),
        frames=rng.integers(0, 255, (frames, 64, 48, 3), dtype=np.uint8), fps=fps,
        audio=(0.1 * rng.standard_normal(round(frames / fps * RATE))).astype(np.float32),
        sample_rate=RATE, start=0.0, end=frames / fps,
    )  # fmt: skip


def _faces(n: int) -> Findings:
    return Findings(fields={"faces": [[[0.2, 0.2, 0.5, 0.5, 0.9]]] * n, "faces_every_n_frames": 1})


def test_mfcc_has_13_coefficients_at_100_hz():
    t = np.arange(RATE) / RATE
    features = mfcc(np.sin(2 * np.pi * 440 * t).astype(np.float32))
    assert features.shape == (13, 99) and np.isfinite(features).all()
    noise = mfcc(np.random.default_rng(0).standard_normal(RATE).astype(np.float32))
    assert not np.allclose(features, noise)


def test_syncnet_weights_from_a_path_score_the_clip(weights):
    scorer = LipSync(syncnet_weights=str(weights), syncnet_max_offset_frames=2)
    found = _faces(12)
    scorer(_clip(), found)
    assert found.methods["lip_sync"] == "syncnet"
    assert set(found.scores) == {"sync_c", "sync_distance", "sync_offset"}
    assert found.scores["sync_c"] >= 0 and abs(found.scores["sync_offset"]) <= 2 / 25
    again = _faces(12)
    scorer(_clip(), again)
    assert again.scores == found.scores  # deterministic
    no_faces = Findings()
    scorer(_clip(), no_faces)  # no face boxes: the labelled proxy (here: nothing to measure)
    assert "sync_c" not in no_faces.scores


def test_syncnet_refuses_other_frame_rates(weights):
    with pytest.raises(AnnotatorUnavailable, match="fps=25"):
        LipSync(syncnet_weights=str(weights))(_clip(fps=8.0), _faces(12))


def test_bad_weights_are_named(tmp_path):
    nodes = default_annotators()
    node = {**nodes["lip_sync"], "syncnet_weights": str(tmp_path / "missing.pt")}
    with pytest.raises(ValueError, match="syncnet_weights=.*is not a file"):
        build_annotators({**nodes, "lip_sync": node})
    torch.save({"netcnnaud.0.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit SyncNet"):
        LipSync(syncnet_weights=str(tmp_path / "other.pt"))


def test_sync_c_decides_audio_strong_when_present():
    scores = {"speech_fraction": 0.8, "loudness_dbfs": -20.0, "face_fraction": 1.0,
              "lip_sync": 0.9}  # fmt: skip
    t = TagThresholds()
    assert audio_tier(scores, t) == "strong"
    assert audio_tier({**scores, "sync_c": 1.0}, t) == "weak"  # SyncNet outranks the proxy
    assert audio_tier({**scores, "sync_c": 6.0, "lip_sync": 0.0}, t) == "strong"
