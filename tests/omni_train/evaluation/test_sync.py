"""Sync-C / Sync-D plumbing with a SyncNet from a path, and the labelled lip-sync proxy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni_train.evaluation.measurement import ClipInputs
from omni_train.evaluation.suite import MetricsConfig
from omni_train.evaluation.sync import SyncMetric, mouth_openings, resample_frames

CARPHONE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "carphone.mp4"
RATE = 16_000


@pytest.fixture(scope="module")
def carphone() -> np.ndarray:
    pytest.importorskip("mediapipe", reason="mediapipe is not installed")
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is not installed")
    if not CARPHONE.is_file():
        pytest.skip(f"{CARPHONE} is absent (real test media live in ../shared/data)")
    import av

    with av.open(str(CARPHONE)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from data_pipelines.annotators.syncnet import SyncNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet.safetensors"
    save_file({k: v.contiguous() for k, v in SyncNet().state_dict().items()}, str(path))
    return path


def _clip(video: np.ndarray, audio: np.ndarray | None, fps: float = 25.0) -> ClipInputs:
    return ClipInputs(key="carphone", real=video, reference=video[0], fps=fps, audio=audio)


def _voice_following(envelope: np.ndarray, fps: float = 25.0) -> np.ndarray:
    """A 250 Hz tone whose RMS under frame t is envelope[t] / sqrt(2) exactly."""
    per_frame = round(RATE / fps)
    tone = np.sin(2 * np.pi * np.arange(per_frame) / 64)
    return np.concatenate([a * tone for a in envelope]).astype(np.float32)


def test_proxy_is_one_when_the_voice_follows_the_mouth(carphone):
    metric = SyncMetric()
    video = carphone[:40]
    mouth = mouth_openings(metric._mp, video)
    assert np.isfinite(mouth).all() and mouth.std() > 0.01
    out = metric(video, _clip(video, _voice_following(mouth)))
    assert out["lipsync_proxy"].value == pytest.approx(1.0, abs=1e-9)
    assert out["lipsync_proxy"].method.startswith("PROXY, not Sync-C")
    for key in ("sync_c", "sync_d", "sync_offset"):
        assert out[key].value is None and "no SyncNet weights" in out[key].reason
    # A voice that follows another clip's mouth scores far lower.
    other = metric(video, _clip(video, _voice_following(mouth[::-1])))
    assert other["lipsync_proxy"].value < 0.5


def test_syncnet_scores_read_the_distance_curve(carphone, weights):
    from data_pipelines.annotators import syncnet
    from omni_train.evaluation.sync import face_boxes

    vshift = 2
    metric = SyncMetric(MetricsConfig(syncnet_weights=str(weights), sync_max_offset=vshift))
    video = carphone[:14]  # at 30 fps -> 11 frames at 25 fps, 6 windows of 5
    audio = 0.1 * np.random.default_rng(0).standard_normal(14 * RATE // 30)
    out = metric(video, _clip(video, audio.astype(np.float32), fps=30.0))
    curve = np.array(out["sync_d"].series)
    assert len(curve) == 2 * vshift + 1
    assert out["sync_d"].value == curve.min()
    assert out["sync_c"].value == pytest.approx(np.median(curve) - curve.min())
    assert out["sync_offset"].value == vshift - int(curve.argmin())
    # The same numbers from the annotator's scorer on the same crops and audio.
    frames = resample_frames(video, 30.0, 25.0)
    crops = syncnet.face_crops(frames, face_boxes(frames), 0.4)
    c, d, k = syncnet.sync_scores(metric.model, crops, audio, vshift)
    assert (out["sync_c"].value, out["sync_d"].value, out["sync_offset"].value) == pytest.approx(
        (c, d, -k)
    )


def test_resampling_to_25_fps_keeps_the_latest_frame_before_each_tick():
    video = np.arange(12)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert resample_frames(video, 30.0, 25.0)[:, 0, 0, 0].tolist() == [
        0,
        1,
        2,
        3,
        4,
        6,
        7,
        8,
        9,
        10,
    ]
    assert resample_frames(video, 50.0, 25.0)[:, 0, 0, 0].tolist() == [0, 2, 4, 6, 8, 10]


def test_bad_input_is_a_labelled_none(carphone, weights, tmp_path):
    video = carphone[:12]
    silent = SyncMetric()(video, _clip(video, None))
    assert all(v.value is None and "no audio" in v.reason for v in silent.values())
    missing = SyncMetric(MetricsConfig(syncnet_weights=str(tmp_path / "none.pt")))
    out = missing(video, _clip(video, np.zeros(12 * 640, np.float32)))
    assert out["sync_c"].value is None and "metrics.syncnet_weights=" in out["sync_c"].reason
    assert "is not a file" in out["sync_c"].reason
    blank = np.full_like(video, 127)
    faceless = SyncMetric(MetricsConfig(syncnet_weights=str(weights)))(
        blank, _clip(blank, np.zeros(12 * 640, np.float32))
    )
    assert faceless["sync_d"].value is None and "no face track" in faceless["sync_d"].reason
    assert faceless["lipsync_proxy"].value is None
