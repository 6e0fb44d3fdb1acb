from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipelines.annotations import PoseTrack
from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.annotators.audio import Loudness, SpeechActivity, integrated_loudness
from data_pipelines.annotators.base import optional_import
from data_pipelines.annotators.face import FaceDetector
from data_pipelines.annotators.image import Motion
from data_pipelines.annotators.lipsync import LipSync, best_offset_correlation
from data_pipelines.config import default_annotators

RATE = 16000


def _clip(frames=None, audio=None, fps=8.0, **kwargs) -> ClipView:
    frames = np.zeros((16, 32, 32, 3), np.uint8) if frames is None else frames
    return ClipView(
        source="x.mp4", path=Path("x.mp4"), frames=frames, fps=fps, audio=audio,
        sample_rate=RATE, start=0.0, end=len(frames) / fps, **kwargs,
    )  # fmt: skip


def _moving_square(shift_per_frame: int) -> np.ndarray:
    frames = np.full((12, 64, 64, 3), 40, np.uint8)
    for t in range(len(frames)):
        x = 10 + t * shift_per_frame
        frames[t, 20:36, x : x + 16] = 220
    return frames


def test_optical_flow_grows_with_motion():
    pytest.importorskip("cv2")
    motion = Motion(backend="farneback")
    amounts = []
    for shift in (0, 1, 3):
        found = Findings()
        motion(_clip(_moving_square(shift)), found)
        amounts.append(found.scores["flow_motion"])
        assert found.methods["motion"] == "farneback_flow"
    assert amounts[0] < 1e-4 < amounts[1] < amounts[2]


def test_frame_diff_backend_needs_nothing():
    found = Findings()
    Motion(backend="frame_diff")(_clip(_moving_square(2)), found)
    assert "flow_motion" not in found.scores and found.scores["motion"] > 0


def test_loudness_follows_bs1770():
    t = np.arange(3 * RATE) / RATE
    # A full-scale 1 kHz sine reads -3.01 LUFS; 20 dB quieter reads 20 LU lower.
    assert integrated_loudness(np.sin(2 * np.pi * 1000 * t), RATE) == pytest.approx(-3.0, abs=0.1)
    quiet = integrated_loudness(0.1 * np.sin(2 * np.pi * 1000 * t), RATE)
    assert quiet == pytest.approx(-23.0, abs=0.1)
    # K-weighting: a 50 Hz hum counts for less than a 3 kHz tone of the same level.
    hum = integrated_loudness(0.1 * np.sin(2 * np.pi * 50 * t), RATE)
    tone = integrated_loudness(0.1 * np.sin(2 * np.pi * 3000 * t), RATE)
    assert hum < quiet < tone
    assert integrated_loudness(np.zeros(RATE, np.float32), RATE) == -120.0
    found = Findings()
    Loudness()(_clip(audio=np.zeros(RATE, np.float32)), found)
    assert found.scores["loudness_dbfs"] == -120.0


def test_speech_backends_record_how_they_measured():
    rng = np.random.default_rng(0)
    audio = (0.001 * rng.standard_normal(2 * RATE)).astype(np.float32)
    found = Findings()
    SpeechActivity(backend="energy")(_clip(audio=audio), found)
    assert found.methods["speech"] == "energy" and found.scores["speech_fraction"] < 0.1
    pytest.importorskip("silero_vad")
    found = Findings()
    SpeechActivity(backend="silero")(_clip(audio=audio), found)
    assert found.methods["speech"] == "silero_vad" and found.scores["speech_fraction"] == 0.0
    found = Findings()
    SpeechActivity()(_clip(audio=None), found)
    assert found.scores == {}


def test_lip_sync_proxy_finds_lips_that_follow_the_voice():
    rng = np.random.default_rng(1)
    envelope = np.abs(rng.standard_normal(40))
    mouth = np.roll(envelope, 2) + 0.05 * rng.standard_normal(40)  # lips 2 frames late
    r, offset, confidence = best_offset_correlation(mouth, envelope, 3, 8)
    assert r > 0.9 and offset == -2 and confidence > 0.5
    unrelated = best_offset_correlation(np.abs(rng.standard_normal(40)), envelope, 3, 8)
    assert unrelated[0] < 0.5
    assert best_offset_correlation(np.full(40, 0.2), envelope, 3, 8) is None  # mouth never moves
    mouth_missing = np.full(40, np.nan)
    assert best_offset_correlation(mouth_missing, envelope, 3, 8) is None


def test_lip_sync_is_labelled_a_proxy():
    fps, frames = 8.0, 32
    rng = np.random.default_rng(2)
    loud = rng.random(frames) > 0.5
    audio = np.concatenate(
        [(0.5 if on else 0.01) * rng.standard_normal(RATE // 8) for on in loud]
    ).astype(np.float32)
    found = Findings(signals={"mouth_opening": np.where(loud, 0.4, 0.05).astype(np.float32)})
    LipSync()(_clip(np.zeros((frames, 8, 8, 3), np.uint8), audio, fps), found)
    assert found.methods["lip_sync"] == "proxy_mouth_opening"
    assert found.scores["lip_sync"] > 0.9 and found.scores["lip_sync_offset"] == 0.0


def test_face_from_sidecar_keypoints():
    keypoints = np.zeros((16, 17, 3), np.float32)
    keypoints[:12, :3] = (0.5, 0.3, 1.0)  # nose and eyes seen in 12 of 16 frames
    found = Findings()
    FaceDetector(backend="sidecar")(_clip(sidecar_pose=PoseTrack(keypoints, 8.0)), found)
    assert found.scores == {"face_fraction": 0.75} and found.methods["face"] == "sidecar_keypoints"


def test_annotators_are_swappable_and_can_be_disabled():
    nodes = default_annotators()
    nodes["motion"] = {
        "_target_": "data_pipelines.annotators.image.Motion",
        "backend": "frame_diff",
    }
    nodes["face"] = None
    names = [a.name for a in build_annotators(nodes)]
    assert names == ["image_quality", "motion", "speech", "loudness", "pose", "lip_sync"]
    with pytest.raises(ValueError, match="annotators.face must be a mapping with _target_"):
        build_annotators({**nodes, "face": {"backend": "auto"}})
    with pytest.raises(ValueError, match="backend='fast'"):
        build_annotators({**nodes, "motion": {**nodes["motion"], "backend": "fast"}})


def test_a_missing_required_package_names_the_fix():
    with pytest.raises(AnnotatorUnavailable, match=r"pip install -e '\.\[annotate\]'"):
        optional_import("no_such_package_xyz", "pose backend=mediapipe", required=True)
    assert optional_import("no_such_package_xyz", "x", required=False) is None
