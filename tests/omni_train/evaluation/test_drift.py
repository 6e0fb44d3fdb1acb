"""Long-video drift per segment: known colour distances and a face that changes identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omni_train.evaluation.drift import DriftMetric, color_distance, segments_of
from omni_train.evaluation.measurement import ClipInputs
from omni_train.evaluation.suite import MetricsConfig

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _clip(reference, video, segments, fps=25.0) -> ClipInputs:
    return ClipInputs(key="long", real=video, reference=reference, fps=fps, segments=segments)


def test_color_distance_known_answers():
    grey, white = np.full((4, 4, 3), 100, np.uint8), np.full((4, 4, 3), 250, np.uint8)
    assert color_distance(grey[None], grey, 32) == 0.0
    assert color_distance(white[None], grey, 32) == 1.0  # no colour in common
    half = np.concatenate([grey[:2], white[:2]])  # half the pixels keep the reference colour
    assert color_distance(half[None], grey, 32) == 0.5
    red = grey.copy()
    red[..., 0] = 250  # one channel of three moved
    assert color_distance(red[None], grey, 32) == pytest.approx(1 / 3)


def test_segments_default_to_fixed_pieces():
    clip = _clip(np.zeros((2, 2, 3), np.uint8), np.zeros((1, 2, 2, 3), np.uint8), [])
    assert segments_of(clip, 120, 2.0) == [(0, 50), (50, 100), (100, 120)]
    clip.segments = [(0, 40), (40, 80), (80, 130)]
    assert segments_of(clip, 120, 2.0) == [(0, 40), (40, 80), (80, 120)]


def test_colour_drift_per_segment_on_a_fading_clip():
    reference = np.full((8, 8, 3), 100, np.uint8)
    # Segment k: k of 4 rows of pixels turned white.
    video = np.repeat(reference[None], 12, axis=0)
    for k in range(3):
        video[4 * k : 4 * k + 4, : 2 * k] = 250
    # An embedder without weights: colours are still measured, identity says why not.
    metric = DriftMetric(MetricsConfig(identity="arcface_onnx", identity_weights=""))
    out = metric(video, _clip(reference, video, [(0, 4), (4, 8), (8, 12)]))
    assert out["drift_color"].series == pytest.approx([0.0, 0.25, 0.5])
    assert out["drift_color"].value == pytest.approx(0.5)
    # Pooled over the whole clip: (0 + 64 + 128) white pixels of 12 x 64 -> 0.25 moved.
    assert out["color_distance"].value == pytest.approx(0.25)
    assert out["color_distance"].higher_is_better is False
    assert out["drift_identity"].value is None
    assert "metrics.identity_weights='' is not a file" in out["drift_identity"].reason


def test_identity_drift_on_a_clip_that_turns_into_another_person():
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is not installed")
    cv2 = pytest.importorskip("cv2")
    for name in ("carphone.mp4", "astronaut.png"):
        if not (SHARED / name).is_file():
            pytest.skip(f"{SHARED / name} is absent (real test media live in ../shared/data)")
    import av
    from PIL import Image

    from omni_train.evaluation.faces import DlibEmbedder

    with av.open(str(SHARED / "carphone.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][:60]
    person = np.asarray(Image.open(SHARED / "astronaut.png").convert("RGB"))
    person = cv2.resize(person, (176, 144), interpolation=cv2.INTER_AREA)
    blank = np.full_like(person, 127)
    # Segment 1: the same man; 2: nobody; 3: another person.
    video = np.stack([frames[30], frames[59], blank, blank, person, person])
    out = DriftMetric(MetricsConfig(drift_frames_per_segment=2))(
        video, _clip(frames[0], video, [(0, 2), (2, 4), (4, 6)])
    )
    embedder = DlibEmbedder()
    ref = embedder.embed(frames[0])
    same = np.mean([embedder.distance(embedder.embed(frames[t]), ref) for t in (30, 59)])
    other = embedder.distance(embedder.embed(person), ref)
    series = out["drift_identity"].series
    assert series[0] == pytest.approx(same) and series[1] is None
    assert series[2] == pytest.approx(other)
    assert out["drift_identity"].value == pytest.approx(other - same)
    assert same < 0.6 < other
