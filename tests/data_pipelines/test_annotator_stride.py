"""Slow models on every Nth frame: which frames run, how the rest are filled, what is recorded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipelines import measures
from data_pipelines.annotators import ClipView, Findings, build_annotators
from data_pipelines.annotators import body as body_module
from data_pipelines.annotators.body import (
    LOWER_LIP,
    MEDIAPIPE_TO_COCO,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    UPPER_LIP,
    BodyPose,
    coco_from_mediapipe,
)
from data_pipelines.annotators.face import FaceDetector
from data_pipelines.annotators.lipsync import LipSync
from data_pipelines.annotators.stride import (
    check_every_n_frames,
    interpolate,
    interpolate_boxes,
    interpolate_points,
    measured_frames,
    with_stride,
)
from data_pipelines.config import SampleCorpusConfig, default_annotators
from data_pipelines.sample_corpus import render_clip
from data_pipelines.scenes import plan_clip

FPS = 8.0
# Mean distance (fraction of the frame) allowed between the keypoints of a strided run and
# those of the every-frame run, over joints visible in both, on the interpolated frames.
MEAN_TOLERANCE = 0.02
# Frames on which the stand-in model finds no body / no face mesh / no left hand; each is a
# measured frame at stride 2 or 3 (or both), so the gaps show in the strided runs.
NO_BODY, NO_FACE, NO_HAND = 12, 6, (4, 9, 18)


def test_the_model_runs_on_every_nth_frame_and_the_last():
    assert measured_frames(7, 3).tolist() == [0, 3, 6]
    assert measured_frames(8, 3).tolist() == [0, 3, 6, 7]
    assert measured_frames(5, 1).tolist() == [0, 1, 2, 3, 4]
    assert measured_frames(1, 2).tolist() == [0]
    assert measured_frames(2, 5).tolist() == [0, 1]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_a_bad_stride_is_named(bad):
    with pytest.raises(ValueError, match=r"annotators\.pose\.every_n_frames=.* whole number >= 1"):
        check_every_n_frames("annotators.pose.every_n_frames", bad)


def test_a_bad_stride_in_the_config_stops_the_build():
    nodes = default_annotators()
    nodes["pose"] = {**nodes["pose"], "backend": "sidecar", "every_n_frames": 0}
    with pytest.raises(ValueError, match=r"annotators\.pose\.every_n_frames=0"):
        build_annotators(nodes)
    with pytest.raises(ValueError, match=r"annotators\.face\.every_n_frames=-1"):
        FaceDetector(backend="sidecar", every_n_frames=-1)
    assert check_every_n_frames("x", np.int64(3)) == 3


def test_methods_gain_the_stride_only_when_it_thins_the_frames():
    assert with_stride("mediapipe_holistic_1", 1) == "mediapipe_holistic_1"
    assert with_stride("mediapipe_holistic_1", 2) == "mediapipe_holistic_1/every_2"


def test_interpolation_between_measured_frames():
    indices = np.array([0, 3, 4])
    values = np.array([[0.0, 10.0], [3.0, 40.0], [9.0, 0.0]], np.float32)
    out = interpolate(values, indices, 5, np.array([True, True, True]), 0.0)
    np.testing.assert_array_equal(out, [[0, 10], [1, 20], [2, 30], [3, 40], [9, 0]])
    assert out.dtype == np.float32
    gap = interpolate(values, indices, 5, np.array([True, False, True]), -1.0)
    np.testing.assert_array_equal(gap, [[0, 10], [-1, -1], [-1, -1], [3, 40], [9, 0]])
    every = interpolate(values, np.arange(3), 3, np.ones(3, bool), 0.0)
    assert every is values  # stride 1: untouched


def test_hands_interpolate_only_where_both_neighbours_have_them():
    left = [[[0.1, 0.2, 1.0]], None, [[0.3, 0.6, 1.0]], [[0.5, 0.2, 1.0]]]
    out = interpolate_points(left, np.array([0, 2, 4, 6]), 7, digits=4)
    assert out == [
        [[0.1, 0.2, 1.0]], None, None, None,
        [[0.3, 0.6, 1.0]], [[0.4, 0.4, 1.0]], [[0.5, 0.2, 1.0]],
    ]  # fmt: skip


def test_face_boxes_pair_up_or_take_the_nearer_frame():
    boxes = [
        [[0.1, 0.1, 0.2, 0.2, 0.9]],
        [[0.4, 0.1, 0.2, 0.2, 0.7]],
        [[0.1, 0.1, 0.2, 0.2, 0.9], [0.6, 0.5, 0.1, 0.1, 0.8]],
    ]
    out = interpolate_boxes(boxes, np.array([0, 3, 5]), 6, digits=4)
    assert out[0] == boxes[0] and out[3] == boxes[1] and out[5] == boxes[2]
    assert out[1] == [[0.2, 0.1, 0.2, 0.2, 0.8333]]
    assert out[2] == [[0.3, 0.1, 0.2, 0.2, 0.7667]]
    assert out[4] == boxes[1]  # 1 face, then 2: a tie goes to the earlier frame


# --------------------------------------------------------------------- a model that sees truth
def _figure(fps: float = FPS) -> SimpleNamespace:
    """The sample corpus's waving figure: frames and the keypoints it was drawn with."""
    frames, audio, keypoints = render_clip(
        plan_clip(0, 0), SampleCorpusConfig(out_dir="unused", fps=int(fps))
    )
    return SimpleNamespace(frames=frames, audio=audio, truth=np.asarray(keypoints, np.float32))


def _view(frames: np.ndarray, audio: np.ndarray | None = None) -> ClipView:
    return ClipView(
        source="x.mp4", path=Path("x.mp4"), frames=frames, fps=FPS, audio=audio,
        sample_rate=16000, start=0.0, end=len(frames) / FPS,
    )  # fmt: skip


def _point(x: float, y: float, visibility: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(x=x, y=y, visibility=visibility)


class _TruthHolistic:
    """Stands in for MediaPipe Holistic: reads each frame's drawn keypoints, so its output
    depends on the frame alone. No body on NO_BODY, no face mesh on NO_FACE, the left hand
    everywhere but NO_HAND and the right hand nowhere; the lips open with sin(t)."""

    def __init__(self, figure: SimpleNamespace) -> None:
        self.index = {frame.tobytes(): t for t, frame in enumerate(figure.frames)}
        self.truth = figure.truth

    def __call__(self, **_options):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        return None

    def process(self, frame: np.ndarray) -> SimpleNamespace:
        t = self.index[frame.tobytes()]
        body = [_point(0.5, 0.5, 0.0)] * 33
        for joint, index in enumerate(MEDIAPIPE_TO_COCO):
            x, y, seen = self.truth[t, joint]
            body[index] = _point(float(x), float(y), 0.9 * float(seen))
        face = [_point(0.5, 0.5)] * 468
        face[MOUTH_LEFT], face[MOUTH_RIGHT] = _point(0.4, 0.6), _point(0.6, 0.6)
        face[UPPER_LIP] = _point(0.5, 0.6)
        face[LOWER_LIP] = _point(0.5, 0.6 + 0.02 * (1.5 + np.sin(t)))
        hand = [_point(0.1 + 0.01 * t, 0.2 + 0.005 * k) for k in range(21)]
        return SimpleNamespace(
            pose_landmarks=None if t == NO_BODY else SimpleNamespace(landmark=body),
            face_landmarks=None if t == NO_FACE else SimpleNamespace(landmark=face),
            left_hand_landmarks=None if t in NO_HAND else SimpleNamespace(landmark=hand),
            right_hand_landmarks=None,
        )


@pytest.fixture(scope="module")
def figure() -> SimpleNamespace:
    return _figure()


def _truth_pose(monkeypatch, figure, every_n_frames: int) -> Findings:
    model = _TruthHolistic(figure)
    fake_mp = SimpleNamespace(solutions=SimpleNamespace(holistic=SimpleNamespace(Holistic=model)))
    monkeypatch.setattr(body_module, "import_mediapipe", lambda why, required: fake_mp)
    found = Findings()
    pose = BodyPose(backend="mediapipe", use_sidecar=False, every_n_frames=every_n_frames)
    pose(_view(figure.frames), found)
    return found


@pytest.mark.parametrize("every_n_frames", [2, 3])
def test_strided_pose_matches_every_frame_where_measured(monkeypatch, figure, every_n_frames):
    every = _truth_pose(monkeypatch, figure, 1)
    strided = _truth_pose(monkeypatch, figure, every_n_frames)
    num_frames = len(figure.frames)
    measured = measured_frames(num_frames, every_n_frames)
    assert measured[0] == 0 and measured[-1] == num_frames - 1
    assert strided.methods["pose"] == f"mediapipe_holistic_1/every_{every_n_frames}"
    assert every.methods["pose"] == "mediapipe_holistic_1"

    full, thin = every.signals["keypoints"], strided.signals["keypoints"]
    np.testing.assert_array_equal(thin[measured], full[measured])
    assert thin.shape == full.shape and len(strided.fields["keypoints"]) == num_frames
    between = np.setdiff1d(np.arange(num_frames), measured)
    mouth_full, mouth = every.signals["mouth_opening"], strided.signals["mouth_opening"]
    np.testing.assert_array_equal(mouth[measured], mouth_full[measured])
    hands, hands_full = strided.fields["hands"], every.fields["hands"]
    assert len(hands) == num_frames and all(pair[1] is None for pair in hands)
    assert [hands[t] for t in measured] == [hands_full[t] for t in measured]
    for t in between:
        k = np.searchsorted(measured, t) - 1
        low, high = measured[k], measured[k + 1]
        weight = (t - low) / (high - low)
        if NO_BODY in (low, high):
            assert not thin[t].any()  # a neighbour without a body: no body here either
        else:
            expected = full[low] + (full[high].astype(np.float64) - full[low]) * weight
            np.testing.assert_allclose(thin[t], expected, rtol=0, atol=1e-6)
        if NO_FACE in (low, high):
            assert np.isnan(mouth[t])
        else:
            expected = mouth_full[low] + (mouth_full[high] - mouth_full[low]) * weight
            assert mouth[t] == pytest.approx(expected, abs=1e-6)
        if low in NO_HAND or high in NO_HAND:
            assert hands[t][0] is None
        else:
            assert hands[t][0][0][:2] == pytest.approx([0.1 + 0.01 * t, 0.2], abs=1e-4)
    assert thin[NO_BODY].sum() == 0 and np.isnan(mouth[NO_FACE])
    assert [hands[t][0] is None for t in measured] == [t in NO_HAND for t in measured]
    visible = (full[between, :, 2] >= 0.5) & (thin[between, :, 2] >= 0.5)
    error = np.linalg.norm(thin[between, :, :2] - full[between, :, :2], axis=-1)[visible]
    assert error.mean() < MEAN_TOLERANCE
    # Jitter reads the accelerations at the measured frames; the rates count those frames.
    assert strided.scores["pose_jitter"] == measures.pose_jitter(thin, measured)
    assert strided.scores["pose_jitter"] != measures.pose_jitter(thin)
    assert strided.scores["face_landmark_fraction"] == pytest.approx(
        np.mean([t != NO_FACE for t in measured])
    )
    assert strided.scores["hand_fraction"] == pytest.approx(
        np.mean([t not in NO_HAND for t in measured])
    )


def test_stride_one_is_the_every_frame_run(monkeypatch, figure):
    found = _truth_pose(monkeypatch, figure, 1)
    keypoints = found.signals["keypoints"]
    assert not keypoints[NO_BODY].any() and keypoints[NO_BODY - 1].any()  # nothing filled in
    assert found.fields["hands"][4] == [None, None] and found.fields["hands"][5][0] is not None
    assert np.isnan(found.signals["mouth_opening"][NO_FACE])
    assert found.scores["hand_fraction"] == pytest.approx(1 - 3 / len(figure.frames))


def test_lip_sync_proxy_reads_the_interpolated_mouth(monkeypatch, figure):
    found = _truth_pose(monkeypatch, figure, 2)
    LipSync()(_view(figure.frames, figure.audio), found)
    assert found.methods["lip_sync"] == "proxy_mouth_opening"
    assert np.isfinite(found.scores["lip_sync"])


# --------------------------------------------------------------------- the real models
@pytest.fixture(scope="module")
def mediapipe_runs(figure) -> dict[int, tuple[Findings, Findings]]:
    pytest.importorskip("mediapipe")
    runs = {}
    for n in (1, 2, 3):
        pose, face = Findings(), Findings()
        BodyPose(backend="mediapipe", use_sidecar=False, every_n_frames=n)(
            _view(figure.frames), pose
        )
        FaceDetector(backend="mediapipe", use_sidecar=False, every_n_frames=n)(
            _view(figure.frames), face
        )
        runs[n] = (pose, face)
    return runs


@pytest.mark.parametrize("every_n_frames", [2, 3])
def test_mediapipe_on_a_stride_follows_the_moving_figure(figure, mediapipe_runs, every_n_frames):
    (pose_1, face_1), (pose_n, face_n) = mediapipe_runs[1], mediapipe_runs[every_n_frames]
    num_frames = len(figure.frames)
    measured = measured_frames(num_frames, every_n_frames)
    between = np.setdiff1d(np.arange(num_frames), measured)
    assert pose_n.methods["pose"] == f"mediapipe_holistic_1/every_{every_n_frames}"
    assert face_n.methods["face"] == f"mediapipe_face_detection_1/every_{every_n_frames}"
    assert face_n.fields["faces_every_n_frames"] == every_n_frames

    full, thin = pose_1.signals["keypoints"], pose_n.signals["keypoints"]
    visible = (full[between, :, 2] >= 0.5) & (thin[between, :, 2] >= 0.5)
    assert visible.mean() > 0.8  # the figure is found on the interpolated frames too
    error = np.linalg.norm(thin[between, :, :2] - full[between, :, :2], axis=-1)[visible]
    assert error.mean() < MEAN_TOLERANCE
    # Against the keypoints the figure was drawn with, the strided run is about as close.
    drawn = figure.truth[between]
    seen = (drawn[..., 2] > 0) & (full[between, :, 2] >= 0.5) & (thin[between, :, 2] >= 0.5)
    off_1 = np.linalg.norm(full[between, :, :2] - drawn[..., :2], axis=-1)[seen].mean()
    off_n = np.linalg.norm(thin[between, :, :2] - drawn[..., :2], axis=-1)[seen].mean()
    assert off_n < off_1 + 0.01

    # The face detector looks at each frame alone: identical boxes on the measured frames.
    boxes_1, boxes_n = face_1.fields["faces"], face_n.fields["faces"]
    assert len(boxes_n) == num_frames
    assert [boxes_n[t] for t in measured] == [boxes_1[t] for t in measured]
    for t in between:
        assert len(boxes_n[t]) == len(boxes_1[t]) == 1
        assert np.abs(np.subtract(boxes_n[t][0][:4], boxes_1[t][0][:4])).max() < 0.02


def test_mediapipe_measured_frames_are_the_models_own_output(figure, mediapipe_runs):
    """Holistic tracks from frame to frame, so on a stride its output on a measured frame is
    what it gives for that frame after the earlier measured ones, stored untouched."""
    pose_2 = mediapipe_runs[2][0]
    measured = measured_frames(len(figure.frames), 2)
    mp = pytest.importorskip("mediapipe")
    expected = []
    with mp.solutions.holistic.Holistic(
        static_image_mode=False, model_complexity=1, min_detection_confidence=0.5
    ) as model:
        for frame in figure.frames[measured]:
            result = model.process(np.ascontiguousarray(frame))
            assert result.pose_landmarks is not None
            expected.append(coco_from_mediapipe(result.pose_landmarks.landmark))
    np.testing.assert_array_equal(pose_2.signals["keypoints"][measured], np.stack(expected))
    stored = np.asarray(pose_2.fields["keypoints"])[measured]
    np.testing.assert_array_equal(stored, np.round(np.stack(expected).astype(np.float64), 4))


def test_syncnet_takes_interpolated_boxes_but_not_one_list_per_measured_frame(tmp_path):
    pytest.importorskip("cv2")
    import torch
    from safetensors.torch import save_file

    from data_pipelines.annotators.syncnet import SyncNet

    torch.manual_seed(0)
    weights = tmp_path / "syncnet.safetensors"
    save_file({k: v.contiguous() for k, v in SyncNet().state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, 64, 48, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(12 * 640)).astype(np.float32)
    clip = ClipView(
        source="x.mp4", path=Path("x.mp4"), frames=frames, fps=25.0, audio=audio,
        sample_rate=16000, start=0.0, end=12 / 25,
    )  # fmt: skip
    measured = measured_frames(12, 2)
    detected = [[[0.2 + 0.01 * t, 0.2, 0.5, 0.5, 0.9]] for t in measured]
    scorer = LipSync(syncnet_weights=str(weights), syncnet_max_offset_frames=2)
    per_frame = interpolate_boxes(detected, measured, 12, 4)
    found = Findings(fields={"faces": per_frame, "faces_every_n_frames": 2})
    scorer(clip, found)
    assert found.methods["lip_sync"] == "syncnet" and "sync_c" in found.scores
    sampled_only = Findings(fields={"faces": detected, "faces_every_n_frames": 2})
    scorer(clip, sampled_only)
    assert "sync_c" not in sampled_only.scores and "lip_sync" not in sampled_only.methods
