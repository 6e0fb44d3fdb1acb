"""HKC / HKV on a real photo with a visible hand, moved by known amounts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omni_train.evaluation import hands
from omni_train.evaluation.hands import (
    HandKeypointMetric,
    follow_hands,
    hand_keypoint_variance,
)
from omni_train.evaluation.measurement import ClipInputs
from omni_train.evaluation.suite import MetricsConfig

MESSI = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "messi5.jpg"
SHIFT = 20  # pixels per frame


@pytest.fixture(scope="module")
def messi() -> np.ndarray:
    pytest.importorskip("mediapipe", reason="mediapipe is not installed")
    if not MESSI.is_file():
        pytest.skip(f"{MESSI} is absent (real test media live in ../shared/data)")
    from PIL import Image

    return np.asarray(Image.open(MESSI).convert("RGB"))


def _clip(video: np.ndarray) -> ClipInputs:
    return ClipInputs(key="messi", real=video, reference=video[0], fps=25.0)


def test_hkv_of_a_hand_moved_by_known_steps_is_the_variance_of_the_steps(messi):
    # Frame t shows the photo moved right by SHIFT * t pixels: every keypoint's x moves by
    # SHIFT * t / width, y stays, so HKV = var(x) / 2 (mean over both axes).
    video = np.stack([np.roll(messi, SHIFT * t, axis=1) for t in range(5)])
    out = HandKeypointMetric()(video, _clip(video))
    expected = np.var(SHIFT * np.arange(5) / messi.shape[1]) / 2
    assert out["hand_fraction"].value == 1.0
    assert out["hkv"].value == pytest.approx(expected, rel=0.1)
    still = HandKeypointMetric()(np.stack([messi] * 3), _clip(video))
    assert still["hkv"].value == pytest.approx(0.0, abs=1e-12)  # static images: same answer


def test_hkc_counts_frames_without_a_hand_as_zero(messi):
    metric = HandKeypointMetric()
    with metric.mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2) as model:
        confidence = max(c for c, _ in hands.detect_hands(model, messi))
    blank = np.full_like(messi, 90)
    video = np.stack([messi, blank, messi, blank])
    out = metric(video, _clip(video))
    assert out["hkc"].value == pytest.approx(confidence / 2)
    assert out["hkc"].series == pytest.approx([confidence, 0.0, confidence, 0.0])
    assert out["hand_fraction"].value == 0.5
    strided = HandKeypointMetric(MetricsConfig(hands_stride=2))(video, _clip(video))
    assert strided["hkc"].value == pytest.approx(confidence)  # frames 0 and 2 only


def test_no_hands_anywhere_is_a_labelled_none(messi):
    blank = np.full((3, 120, 160, 3), 90, np.uint8)
    out = HandKeypointMetric()(blank, _clip(blank))
    assert out["hand_fraction"].value == 0.0
    assert out["hkc"].value is None and "no hand detected" in out["hkc"].reason
    assert out["hkv"].value is None


def test_hands_are_followed_by_wrist_proximity_not_order():
    left, right = np.zeros((21, 2)), np.full((21, 2), 0.8)
    frames = [
        [(0.9, left)],
        [(0.9, right), (0.6, left + 0.02)],  # a second hand appears, the more confident one
        [(0.7, right + 0.1), (0.8, left)],  # order and confidences swap
    ]
    tracks = follow_hands(frames)
    assert [len(t) for t in tracks] == [3, 2]
    # left: x, y in {0, 0.02, 0} -> var 8.89e-5; right: {0.8, 0.9} -> var 0.0025.
    expected = (np.var([0, 0.02, 0]) + np.var([0.8, 0.9])) / 2
    assert hand_keypoint_variance(tracks) == pytest.approx(expected)


def test_missing_mediapipe_is_a_labelled_none(monkeypatch):
    import data_pipelines.annotators.mediapipe_compat as compat

    monkeypatch.setattr(compat, "import_mediapipe", lambda why, required: None)
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    out = HandKeypointMetric()(frames, _clip(frames))
    assert all(v.value is None and "not installed" in v.reason for v in out.values())
