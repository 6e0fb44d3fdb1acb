"""Identity distances against dlib's known answers on real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omni_train.evaluation import faces
from omni_train.evaluation.identity import IdentityMetric, quarter_drift
from omni_train.evaluation.measurement import ClipInputs
from omni_train.evaluation.suite import MetricsConfig

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is not installed")
pytest.importorskip("cv2", reason="the annotate extra (opencv) is not installed")


def _shared(name: str) -> Path:
    if not (SHARED / name).is_file():
        pytest.skip(f"{SHARED / name} is absent (real test media live in ../shared/data)")
    return SHARED / name


@pytest.fixture(scope="module")
def carphone() -> np.ndarray:
    import av

    with av.open(str(_shared("carphone.mp4"))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _full_astronaut() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(_shared("astronaut.png")).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut(carphone) -> np.ndarray:
    """The astronaut photo at the carphone's frame size (one video holds both)."""
    import cv2

    return cv2.resize(_full_astronaut(), carphone.shape[2:0:-1], interpolation=cv2.INTER_AREA)


def _clip(reference: np.ndarray, real: np.ndarray) -> ClipInputs:
    return ClipInputs(key="carphone", real=real, reference=reference, fps=30.0)


def test_same_person_and_other_person_fall_on_either_side_of_dlibs_threshold(carphone):
    embedder = faces.DlibEmbedder()
    a, b = embedder.embed(carphone[0]), embedder.embed(carphone[100])
    astronaut = embedder.embed(_full_astronaut())
    # dlib's answers measured on these files: 0.25 for the same man, 0.87 against the astronaut.
    assert embedder.distance(a, b) == pytest.approx(0.254, abs=0.01)
    assert embedder.distance(a, astronaut) == pytest.approx(0.871, abs=0.01)
    metric = IdentityMetric(MetricsConfig(identity_frames=0))
    same = metric(carphone[[100]], _clip(carphone[0], carphone[[100]]))
    assert same["identity_distance"].value == pytest.approx(embedder.distance(a, b), abs=1e-9)
    assert same["identity_face_fraction"].value == 1.0
    assert same["identity_distance"].value < faces.DLIB_THRESHOLD


def test_drift_and_face_fraction_on_a_clip_that_turns_into_another_person(carphone, astronaut):
    embedder = faces.DlibEmbedder()
    reference = carphone[0]
    blank = np.full_like(reference, 127)
    # 8 scored frames: 2 x the reference, 4 x the same man, 2 x another person; 2 blank frames.
    video = np.stack([reference, reference, *carphone[[20, 40, 60, 80]], astronaut, astronaut,
                      blank, blank])  # fmt: skip
    out = IdentityMetric(MetricsConfig(identity_frames=0))(video, _clip(reference, video))
    ref = embedder.embed(reference)
    other = embedder.distance(embedder.embed(astronaut), ref)
    same = [embedder.distance(embedder.embed(carphone[t]), ref) for t in (20, 40, 60, 80)]
    assert out["identity_face_fraction"].value == pytest.approx(8 / 10)
    assert out["identity_distance"].value == pytest.approx((sum(same) + 2 * other) / 8)
    assert out["identity_drift"].value == pytest.approx(other - 0.0, abs=1e-9)
    assert out["identity_distance"].series == pytest.approx([0.0, 0.0, *same, other, other])


def test_quarter_drift_is_last_minus_first_quarter():
    assert quarter_drift(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0])) == 8.0 - 1.5
    assert quarter_drift(np.array([1.0, 2.0, 3.0])) is None


def test_reference_embedding_is_computed_once_per_clip(carphone, monkeypatch):
    metric = IdentityMetric(MetricsConfig(identity_frames=2))
    calls = []
    embed = metric.embedder.embed
    monkeypatch.setattr(metric.embedder, "embed", lambda f: calls.append(1) or embed(f))
    clip = _clip(carphone[0], carphone[:8])
    for _ in range(3):  # generated, real, static reference
        metric(carphone[:8], clip)
    assert len(calls) == 1 + 3 * 2


def test_small_frames_are_enlarged_before_detection(carphone):
    import cv2

    small = cv2.resize(carphone[0], (64, 64), interpolation=cv2.INTER_AREA)
    assert len(faces.detect_faces(small)) == 1  # the HOG detector alone misses this face
    box = faces.detect_faces(small)[0]
    assert 15 <= box.right - box.left <= 25 and box.right <= 64


def test_no_face_in_the_reference_is_a_labelled_none(carphone):
    blank = np.full_like(carphone[0], 127)
    out = IdentityMetric()(carphone[:4], _clip(blank, carphone[:4]))
    assert set(out) == {"identity_distance", "identity_face_fraction", "identity_drift"}
    assert all(v.value is None and "reference" in v.reason for v in out.values())
    faceless = IdentityMetric()(np.stack([blank] * 4), _clip(carphone[0], carphone[:4]))
    assert faceless["identity_face_fraction"].value == 0.0
    assert faceless["identity_distance"].value is None
    assert "no face detected in any" in faceless["identity_distance"].reason


def test_missing_embedder_is_a_labelled_none(monkeypatch, tmp_path):
    def missing():
        raise faces.FaceToolsMissing("dlib is not installed: pip install -e '.[eval]'")

    monkeypatch.setattr(faces, "_dlib_models", missing)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    out = IdentityMetric()(frames, _clip(frames[0], frames))
    assert all(v.value is None and "dlib is not installed" in v.reason for v in out.values())
    arcface = IdentityMetric(
        MetricsConfig(identity="arcface_onnx", identity_weights=str(tmp_path / "arcface.onnx"))
    )(frames, _clip(frames[0], frames))
    assert all("is not a file" in v.reason for v in arcface.values())
