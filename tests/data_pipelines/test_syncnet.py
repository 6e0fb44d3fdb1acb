from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.annotators.lipsync import LipSync
from data_pipelines.annotators.syncnet import (
    SyncNet,
    distance_curve,
    embeddings,
    face_crops,
    median_filter,
    mfcc,
    pcm16,
    scores_from_curve,
    sync_scores,
)
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
              "lip_sync": 0.9, "lip_sync_p": 0.001}  # fmt: skip
    t = TagThresholds()
    assert audio_tier(scores, t) == "strong"
    assert audio_tier({**scores, "sync_c": 1.0}, t) == "weak"  # SyncNet outranks the proxy
    assert audio_tier({**scores, "sync_c": 6.0, "lip_sync": 0.0}, t) == "strong"


def test_mfcc_is_python_speech_features_mfcc():
    psf = pytest.importorskip("python_speech_features", reason="the eval extra is not installed")
    rng = np.random.default_rng(1)
    audio = pcm16(0.3 * np.sin(np.arange(8000) / 7.0) + 0.05 * rng.standard_normal(8000))
    reference = psf.mfcc(audio, RATE)  # what SyncNetInstance.py:84 computes
    np.testing.assert_allclose(mfcc(audio), reference.T, rtol=1e-5, atol=1e-4)


def test_pcm16_scales_like_a_wav_file():
    assert pcm16(np.array([0.0, 0.5, -1.0, 1.0])).tolist() == [0, 16384, -32768, 32767]


def test_median_filter_is_scipys_medfilt():
    signal = pytest.importorskip("scipy.signal")
    values = np.random.default_rng(2).uniform(10, 20, 30)
    np.testing.assert_allclose(median_filter(values), signal.medfilt(values, kernel_size=13))


def test_face_crops_cut_the_reference_window():
    import cv2

    frame = np.random.default_rng(3).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    # Box 20 x 20 at (40, 40): s = 10, centre (50, 50), c = 0.4: rows 50 - 10 .. 50 + 18,
    # columns 50 - 14 .. 50 + 14 (run_pipeline.py:145).
    crops = face_crops(np.stack([frame] * 3), [[[0.4, 0.4, 0.2, 0.2, 1.0]]] * 3, 0.4)
    expected = cv2.resize(frame[40:68, 36:64], (224, 224), interpolation=cv2.INTER_LINEAR)
    assert crops.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(crops[1], expected)
    # At the corner the frame is padded with the grey 110; a middle frame without a face is
    # interpolated, a first frame without one is not.
    corner = face_crops(frame[None], [[[0.0, 0.0, 0.2, 0.2, 1.0]]], 0.4)
    assert (corner[0, :5, :5] == 110).all()
    gap = [[[0.4, 0.4, 0.2, 0.2, 1.0]], [], [[0.4, 0.4, 0.2, 0.2, 1.0]]]
    np.testing.assert_array_equal(face_crops(np.stack([frame] * 3), gap, 0.4)[1], expected)
    assert face_crops(np.stack([frame] * 3), gap[::-1][1:] + gap[:1], 0.4) is None


def test_offset_search_finds_a_known_shift():
    torch.manual_seed(0)
    lips = torch.randn(20, 8)
    voice = torch.randn(20, 8)
    voice[3:] = lips[:-3]  # audio window i + 3 carries video window i: audio after the lips
    curve = distance_curve(lips, voice, vshift=5)
    confidence, distance, av_offset = scores_from_curve(curve, vshift=5)
    assert av_offset == -3 and int(np.argmin(curve)) == 5 + 3
    # Shift 0 by hand: mean over all windows of |lips_i - voice_i| (eps 1e-6 added as torch).
    by_hand = (lips - voice + 1e-6).norm(dim=1).mean()
    assert curve[5] == pytest.approx(float(by_hand), rel=1e-6)
    # Shift +3: 17 matching windows at distance ~sqrt(8) * 1e-6, 3 against the zero padding.
    padded = (lips[17:] + 1e-6).norm(dim=1).sum()
    assert distance == pytest.approx(float(padded + 17 * np.sqrt(8) * 1e-6) / 20, rel=1e-5)
    assert confidence == pytest.approx(float(np.median(curve)) - distance)


def test_sync_scores_feed_bgr_pixels_and_pcm16_mfcc(weights):
    from data_pipelines.annotators.syncnet import load_syncnet

    model = load_syncnet(str(weights))
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 255, (9, 224, 224, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(9 * 640)).astype(np.float32)
    confidence, distance, k = sync_scores(model, crops, audio, max_offset=2)
    with torch.inference_mode():  # the reference's tensors: BGR 0-255 and int16 MFCC
        video = torch.from_numpy(crops[..., ::-1].copy()).float().permute(3, 0, 1, 2)
        lips = model.lips(torch.stack([video[:, t : t + 5] for t in range(4)]))  # 9 - 5 windows
        features = torch.from_numpy(mfcc(pcm16(audio))).float()
        voice = model.audio(
            torch.stack([features[:, 4 * t : 4 * t + 20] for t in range(4)])[:, None]
        )
    c, d, av = scores_from_curve(distance_curve(lips, voice, 2), 2)
    assert (confidence, distance, k) == pytest.approx((c, d, -av))
    assert embeddings(model, crops[:5], pcm16(audio)) is None  # min_length - 5 = 0
