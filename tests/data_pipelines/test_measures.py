from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import measures
from data_pipelines.config import VoiceActivityConfig
from data_pipelines.drawing import box_blur
from data_pipelines.voice import near_silence, read_wav, synthetic_voice

VAD = VoiceActivityConfig()


def test_real_speech_is_found_where_it_is(shared_data):
    audio, rate = read_wav(shared_data / "speech_sample.wav")
    assert rate == 16000
    floor = measures.noise_floor_dbfs(audio, rate, VAD)
    before = measures.speech_fraction(audio[: 6 * rate], rate, VAD, floor)
    second_half = measures.speech_fraction(audio[15 * rate :], rate, VAD, floor)
    assert before < 0.1
    assert second_half > 0.4
    assert measures.loudness_dbfs(audio[15 * rate :]) > measures.loudness_dbfs(audio[: 6 * rate])


def test_voice_is_active_and_room_tone_is_not():
    rng = np.random.default_rng(0)
    speech = synthetic_voice(rng, 3.0, 16000)
    hush = near_silence(rng, 3.0, 16000)
    assert measures.speech_fraction(speech, 16000, VAD) > 0.4
    assert measures.speech_fraction(hush, 16000, VAD) == 0.0
    assert measures.loudness_dbfs(hush) < -60 < -30 < measures.loudness_dbfs(speech)
    assert measures.loudness_dbfs(np.zeros(100, np.float32)) == measures.SILENCE_DBFS


def test_sharpness_drops_with_blur_and_motion_grows_with_change():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    blurred = np.stack([box_blur(f.astype(np.float32), 2) for f in frames]).astype(np.uint8)
    assert measures.sharpness(blurred) < 0.2 * measures.sharpness(frames)
    still = np.repeat(frames[:1], 4, axis=0)
    assert measures.motion(still) == 0.0
    assert measures.motion(frames) > 0.1
    assert measures.contrast(np.full((3, 8, 8, 3), 90, np.uint8)) == 0.0


def _track(num_frames: int = 20, noise: float = 0.0, hidden: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, (17, 2))
    t = np.arange(num_frames)[:, None, None] / num_frames
    xy = base[None] + 0.1 * t + noise * rng.standard_normal((num_frames, 17, 2))
    keypoints = np.concatenate([xy, np.ones((num_frames, 17, 1))], axis=-1).astype(np.float32)
    keypoints[:, list(hidden)] = 0.0
    return keypoints


def test_pose_scores():
    smooth = _track()
    assert measures.pose_visibility(smooth) == 1.0
    assert measures.head_visibility(smooth) == 1.0
    assert measures.pose_jitter(smooth) < 1e-6
    assert measures.keypoint_motion(smooth) == pytest.approx(0.1 / 20 * np.sqrt(2), rel=1e-3)
    assert measures.pose_jitter(_track(noise=0.02)) > 0.01
    legs_out = _track(hidden=tuple(range(11, 17)))
    assert measures.pose_visibility(legs_out) == pytest.approx(11 / 17)
    assert measures.head_visibility(legs_out) == 1.0
    assert measures.head_visibility(_track(hidden=(0,))) == 0.0


def _talking_face(envelope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a face whose mouth (a dark bar below the nose) opens with ``envelope``."""
    frames = np.full((len(envelope), 64, 64, 3), 200, np.uint8)
    for frame, opening in zip(frames, envelope, strict=True):
        rows = 1 + int(round(5 * opening))
        frame[38 : 38 + rows, 28:36] = 40
    keypoints = np.zeros((len(envelope), 17, 3), np.float32)
    keypoints[:, 0] = (32 / 64, 32 / 64, 1)  # nose
    keypoints[:, 1] = (38 / 64, 28 / 64, 1)  # eyes 12 px apart
    keypoints[:, 2] = (26 / 64, 28 / 64, 1)
    return frames, keypoints


def test_lip_sync_follows_the_voice():
    rng = np.random.default_rng(0)
    envelope = np.abs(np.sin(np.arange(24) * 0.7)) * (rng.random(24) > 0.2)
    audio = np.concatenate([rng.standard_normal(2000) * e for e in envelope]).astype(np.float32)
    frames, keypoints = _talking_face(envelope)
    in_sync = measures.lip_sync(frames, keypoints, audio, 16000, 8.0)
    other = np.concatenate([rng.standard_normal(2000) * e for e in rng.permutation(envelope)])
    out_of_sync = measures.lip_sync(frames, keypoints, other.astype(np.float32), 16000, 8.0)
    assert in_sync > 0.8
    assert out_of_sync < in_sync - 0.4
    closed, _ = _talking_face(np.zeros(24))
    assert measures.lip_sync(closed, keypoints, audio, 16000, 8.0) is None  # mouth never moves
    assert measures.lip_sync(frames, np.zeros_like(keypoints), audio, 16000, 8.0) is None


def test_precomputed_grey_frames_give_the_same_scores_to_the_bit():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, (5, 24, 20, 3)).astype(np.uint8)
    grey = measures.grey(frames)
    for measure in (measures.sharpness, measures.contrast, measures.brightness, measures.motion):
        assert measure(frames, grey) == measure(frames)
    # The argument is used as given (not recomputed): a different grey gives another score.
    assert measures.contrast(frames, np.zeros_like(grey)) == 0.0
    with pytest.raises(ValueError, match=r"grey_frames .* is not grey\(frames\)"):
        measures.sharpness(frames, grey[:, :-1])
    with pytest.raises(ValueError, match="float32"):
        measures.motion(frames, grey.astype(np.float64))


def test_lip_sync_takes_precomputed_grey_frames():
    rng = np.random.default_rng(0)
    envelope = np.abs(np.sin(np.arange(24) * 0.7)) * (rng.random(24) > 0.2)
    audio = np.concatenate([rng.standard_normal(2000) * e for e in envelope]).astype(np.float32)
    frames, keypoints = _talking_face(envelope)
    plain = measures.lip_sync(frames, keypoints, audio, 16000, 8.0)
    shared = measures.lip_sync(frames, keypoints, audio, 16000, 8.0, measures.grey(frames))
    assert shared == plain


def test_pose_jitter_can_count_chosen_frames_only():
    keypoints = np.zeros((5, 17, 3), np.float32)
    keypoints[..., 2] = 1.0
    keypoints[:, :, 0] = np.array([0.0, 0.0, 0.3, 0.3, 0.3])[:, None]  # one step at frame 2
    # Accelerations at frames 1, 2, 3: 0.3, -0.3, 0 -> median |a| over all = 0.3.
    assert measures.pose_jitter(keypoints) == pytest.approx(0.3)
    assert measures.pose_jitter(keypoints, np.array([3])) == 0.0
    assert measures.pose_jitter(keypoints, np.array([0, 2, 4])) == pytest.approx(0.3)
    assert measures.pose_jitter(keypoints, np.array([0, 4])) == 0.0  # no counted frame
