"""The model annotators on input the tests make themselves, checked against known answers.

Silero VAD hears a synthetic voice placed at a known time in room noise; MediaPipe Holistic
and face detection see the sample corpus's drawn figure, whose joints, head and mouth are
known from the drawing. Needs silero-vad / mediapipe, not the real media of ../shared/data.
Tolerances are the measured errors with some margin (see each constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.annotators import ClipView, Findings
from data_pipelines.annotators.audio import SILERO_CHUNK, SILERO_RATE, Loudness, SpeechActivity
from data_pipelines.annotators.body import BodyPose
from data_pipelines.annotators.face import FaceDetector
from data_pipelines.annotators.lipsync import LipSync
from data_pipelines.config import SampleCorpusConfig, TagThresholds
from data_pipelines.drawing import Canvas
from data_pipelines.figure import J, pose_body
from data_pipelines.media import resample_audio
from data_pipelines.sample_corpus import render_clip
from data_pipelines.scenes import plan_clip, pose_at
from data_pipelines.tags import audio_tier, pose_tier
from data_pipelines.voice import frame_envelope, synthetic_voice

RATE = 16000
FPS = 8.0
THRESHOLDS = TagThresholds()


def _clip(frames: np.ndarray, audio: np.ndarray | None, rate: int = RATE) -> ClipView:
    return ClipView(
        source="made.mp4", path=Path("made.mp4"), frames=frames, fps=FPS, audio=audio,
        sample_rate=rate, start=0.0, end=len(frames) / FPS,
    )  # fmt: skip


def _spans(mask: np.ndarray, step_seconds: float, bridge_seconds: float = 0.0) -> list:
    """[(start, end)] seconds of the runs of True in ``mask``, joining runs whose gap is
    shorter than ``bridge_seconds``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    spans: list[list[float]] = []
    for start, end in zip(edges[::2] * step_seconds, edges[1::2] * step_seconds, strict=True):
        if spans and start - spans[-1][1] < bridge_seconds:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    return [tuple(span) for span in spans]


# ------------------------------------------------------------------ Silero VAD
CHUNK_SECONDS = SILERO_CHUNK / SILERO_RATE  # one speech probability per 32 ms
VOICE_AT, VOICE_SECONDS, CLIP_SECONDS = 2.0, 2.5, 6.0
# Measured on this voice: Silero's word onsets land 0-0.04 s after the true ones, its word
# ends 0.06-0.10 s after them (it holds on briefly), its speech fraction 0.015 above the
# share of 32 ms chunks that hold sound.
ONSET_TOLERANCE = 2 * CHUNK_SECONDS
HOLD_TOLERANCE = 5 * CHUNK_SECONDS


@dataclass(frozen=True)
class PlacedVoice:
    audio: np.ndarray  # room noise with the voice added from VOICE_AT
    room: np.ndarray  # the noise alone
    sounding: np.ndarray  # per sample: the voice is making sound here
    voice_rms: float  # RMS of the voice where it sounds


@pytest.fixture(scope="module")
def silero() -> SpeechActivity:
    pytest.importorskip("silero_vad")
    return SpeechActivity(backend="silero")


@pytest.fixture(scope="module")
def placed() -> PlacedVoice:
    rng = np.random.default_rng(0)
    voice = synthetic_voice(rng, VOICE_SECONDS, RATE)  # words of syllables, pauses between
    room = (0.005 * rng.standard_normal(round(CLIP_SECONDS * RATE))).astype(np.float32)  # -46 dBFS
    start = round(VOICE_AT * RATE)
    audio = room.copy()
    audio[start : start + len(voice)] += voice
    sounding = np.zeros(len(audio), bool)
    sounding[start : start + len(voice)] = voice != 0
    voice_rms = float(np.sqrt(np.mean(voice[voice != 0] ** 2)))
    return PlacedVoice(audio, room, sounding, voice_rms)


def _words(placed: PlacedVoice) -> list:
    # Syllables of a word touch (a zero sample between them); words are >= 0.15 s apart.
    return _spans(placed.sounding, 1 / RATE, bridge_seconds=0.05)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_silero_marks_each_word_where_it_was_placed(silero, placed, rate):
    audio = resample_audio(placed.audio, RATE, rate)
    detected = _spans(silero.speech_probabilities(audio, rate) >= 0.5, CHUNK_SECONDS)
    words = _words(placed)
    assert len(words) == 3 and words[0][0] > VOICE_AT
    assert len(detected) == len(words), (detected, words)  # nothing in the noise around them
    for (word_start, word_end), (start, end) in zip(words, detected, strict=True):
        assert abs(start - word_start) <= ONSET_TOLERANCE, (start, word_start)
        assert 0.0 <= end - word_end <= HOLD_TOLERANCE, (end, word_end)


def test_silero_speech_fraction_is_the_share_of_the_clip_spoken(silero, placed):
    found = Findings()
    silero(_clip(np.zeros((4, 8, 8, 3), np.uint8), placed.audio), found)
    chunks = -(-len(placed.audio) // SILERO_CHUNK)
    padded = np.zeros(chunks * SILERO_CHUNK, bool)
    padded[: len(placed.sounding)] = placed.sounding
    spoken = padded.reshape(chunks, SILERO_CHUNK).any(axis=1).mean()
    assert found.methods["speech"] == "silero_vad"
    assert found.scores["speech_fraction"] == pytest.approx(spoken, abs=0.03)
    assert 0.25 < spoken < 0.35  # the check above is not satisfied by an all-or-nothing score


def test_silero_ignores_sounds_as_loud_as_the_voice_that_are_not_speech(silero, placed):
    """Noise and a steady hum shaped and timed exactly like the words: the energy detector
    takes them for speech, Silero does not."""
    rng = np.random.default_rng(1)
    seconds = np.arange(len(placed.audio)) / RATE
    noise = placed.voice_rms * rng.standard_normal(len(placed.audio)).astype(np.float32)
    hum = np.sqrt(2) * placed.voice_rms * np.sin(2 * np.pi * 220 * seconds).astype(np.float32)
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    for name, sound in (("noise", noise), ("hum", hum)):
        audio = (placed.room + sound * placed.sounding).astype(np.float32)
        by_silero, by_energy = Findings(), Findings()
        silero(_clip(frames, audio), by_silero)
        SpeechActivity(backend="energy")(_clip(frames, audio), by_energy)
        assert by_energy.scores["speech_fraction"] > 0.25, name
        assert by_silero.scores["speech_fraction"] < 0.05, name
    for quiet in (placed.room, np.zeros_like(placed.room)):
        found = Findings()
        silero(_clip(frames, quiet), found)
        assert found.scores["speech_fraction"] == 0.0


# ------------------------------------------------------- MediaPipe on a drawn figure
# Largest keypoint error allowed per COCO joint, in radii of the drawn head: 1.5-2x the
# largest error measured over the walking and close-up figures (head radius 7 and 22 px).
# Swapping left and right would move an eye 0.8, a hip 1.9 and a shoulder 3.2 radii.
JOINT_TOLERANCE = {
    "nose": 0.4, "left_eye": 0.4, "right_eye": 0.4, "left_ear": 0.8, "right_ear": 0.8,
    "left_shoulder": 0.6, "right_shoulder": 0.6, "left_elbow": 0.9, "right_elbow": 0.9,
    "left_wrist": 1.2, "right_wrist": 1.2, "left_hip": 0.6, "right_hip": 0.6,
    "left_knee": 0.9, "right_knee": 0.9, "left_ankle": 1.8, "right_ankle": 1.8,
}  # fmt: skip
# The face box against the box around the drawn head (hair aside): IoU measured 0.58-0.72.
MIN_FACE_IOU = 0.5


@dataclass(frozen=True)
class DrawnClip:
    frames: np.ndarray
    audio: np.ndarray
    keypoints: np.ndarray  # (T, 17, 3) as drawn: x, y normalised, 1 inside the frame
    heads: np.ndarray  # (T, 3) head centre x, y and radius in pixels
    mouth: np.ndarray  # (T,) how far the drawn mouth opens, 0-1


def _draw(plan_index: int, num_frames: int) -> DrawnClip:
    plan = plan_clip(plan_index, 0)
    cfg = SampleCorpusConfig(out_dir="unused", fps=round(FPS), voice="synthetic")
    frames, audio, keypoints = render_clip(plan, cfg)
    frames, keypoints = frames[:num_frames], np.asarray(keypoints, np.float32)[:num_frames]
    audio = audio[: round(num_frames / FPS * RATE)]
    bodies = [pose_body(pose_at(plan, i / FPS)) for i in range(num_frames)]
    heads = np.array([[*body.head_center, body.head_radius] for body in bodies], np.float32)
    # As render_clip opens the mouth: the voice's envelope, smoothed over three frames.
    envelope = frame_envelope(audio, RATE, FPS, num_frames)
    mouth = np.convolve(envelope, [0.25, 0.5, 0.25], mode="same")
    return DrawnClip(frames, audio, keypoints, heads, mouth)


@pytest.fixture(scope="module")
def models() -> tuple[BodyPose, FaceDetector]:
    pytest.importorskip("mediapipe")
    return (
        BodyPose(backend="mediapipe", use_sidecar=False),
        FaceDetector(backend="mediapipe", use_sidecar=False),
    )


def _annotate(models, frames: np.ndarray, audio: np.ndarray | None) -> Findings:
    found = Findings()
    clip = _clip(frames, audio)
    for annotator in models:
        annotator(clip, found)
    return found


@pytest.fixture(scope="module")
def walking(models) -> tuple[DrawnClip, Findings]:
    """The walking figure, whole body in view, up to its hard cut at 2.5 s; no speech."""
    drawn = _draw(1, 20)
    return drawn, _annotate(models, drawn.frames, None)


@pytest.fixture(scope="module")
def closeup(models, silero) -> tuple[DrawnClip, Findings]:
    """The close-up: head to waist in view, the legs below the frame, lips moving with the
    voice."""
    drawn = _draw(3, 29)
    speech = (silero, Loudness(), LipSync())
    return drawn, _annotate((*models, *speech), drawn.frames, drawn.audio)


def _joint_errors(drawn: DrawnClip, found: Findings) -> np.ndarray:
    """(T, 17) distance from each found joint to the drawn one, in head radii."""
    height, width = drawn.frames.shape[1:3]
    found_points = np.asarray(found.fields["keypoints"], np.float32)
    offset = (found_points[..., :2] - drawn.keypoints[..., :2]) * (width, height)
    return np.hypot(offset[..., 0], offset[..., 1]) / drawn.heads[:, None, 2]


def _assert_joints_where_drawn(drawn: DrawnClip, found: Findings, joints: list[str]) -> None:
    errors = _joint_errors(drawn, found)
    seen = np.asarray(found.fields["keypoints"])[..., 2] >= 0.5
    for name in joints:
        assert seen[:, J[name]].all(), name
        worst = float(errors[:, J[name]].max())
        assert worst <= JOINT_TOLERANCE[name], f"{name}: {worst:.2f} head radii off"


def test_holistic_finds_every_joint_of_the_walking_figure(walking):
    drawn, found = walking
    assert drawn.keypoints[..., 2].all()  # the whole body is drawn inside every frame
    _assert_joints_where_drawn(drawn, found, list(JOINT_TOLERANCE))
    assert found.methods["pose"] == "mediapipe_holistic_1"
    assert found.scores["pose_visibility"] > THRESHOLDS.pose_strong_visibility
    assert pose_tier(found.scores, THRESHOLDS) == "strong"


def test_holistic_sees_the_close_up_legs_leave_the_frame(closeup):
    drawn, found = closeup
    upper = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    _assert_joints_where_drawn(drawn, found, [*upper, "left_shoulder", "right_shoulder"])
    seen = np.asarray(found.fields["keypoints"])[..., 2] >= 0.5
    drawn_inside = drawn.keypoints[..., 2] > 0
    legs = [J[f"{side}_{part}"] for side in ("left", "right") for part in ("knee", "ankle")]
    assert not drawn_inside[:, legs].any() and not seen[:, legs].any()
    # Seen where drawn inside the frame, unseen where not, but for an elbow crossing the edge.
    assert (seen != drawn_inside).mean() < 0.01
    assert pose_tier(found.scores, THRESHOLDS) == "weak"  # half the body


def _head_iou(box: list[float], head: np.ndarray, width: int, height: int) -> float:
    x, y, w, h = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    (cx, cy, radius), half_width = head, 0.92 * head[2]  # the face ellipse of draw_figure
    ix = max(0.0, min(x + w, cx + half_width) - max(x, cx - half_width))
    iy = max(0.0, min(y + h, cy + radius) - max(y, cy - radius))
    overlap = ix * iy
    return overlap / (w * h + 4 * half_width * radius - overlap)


@pytest.mark.parametrize("which", ["walking", "closeup"])
def test_face_box_covers_the_drawn_head(which, request):
    drawn, found = request.getfixturevalue(which)
    height, width = drawn.frames.shape[1:3]
    assert found.methods["face"] == "mediapipe_face_detection_1"
    assert found.scores["face_fraction"] == 1.0 and found.scores["face_count_max"] == 1.0
    for boxes, head in zip(found.fields["faces"], drawn.heads, strict=True):
        (box,) = boxes
        assert _head_iou(box, head, width, height) >= MIN_FACE_IOU, (box, head)
    head_area = np.pi * 0.92 * drawn.heads[:, 2] ** 2 / (width * height)
    assert found.scores["face_area"] == pytest.approx(float(head_area.mean()), rel=0.25)


def test_a_face_painted_over_is_not_found(models):
    """The same close-up with a skin-coloured disc over eyes, nose and mouth."""
    drawn = _draw(3, 8)
    skin = plan_clip(3, 0).style.skin
    covered = []
    for frame, (cx, cy, radius) in zip(drawn.frames, drawn.heads, strict=True):
        canvas = Canvas(frame)
        canvas.ellipse(np.array([cx, cy]), 0.92 * radius, radius, skin)
        covered.append(np.clip(canvas.image + 0.5, 0, 255).astype(np.uint8))
    found = _annotate(models, np.stack(covered), None)
    assert found.scores["face_fraction"] == 0.0 and found.fields["faces"] == [[]] * 8
    assert found.scores["face_landmark_fraction"] == 0.0


def test_the_backdrop_alone_has_no_person(models):
    plan = plan_clip(1, 0)
    scene, kind = plan.scenes[0], plan.kind
    near, far = (np.asarray(color, np.float32) for color in scene.colors)
    backdrop = near + scene.texture[:, : kind.width, None] * (far - near)
    frames = np.repeat(np.clip(backdrop + 0.5, 0, 255).astype(np.uint8)[None], 8, axis=0)
    found = _annotate(models, frames, None)
    assert found.scores["pose_visibility"] == 0.0 and found.scores["face_fraction"] == 0.0
    assert not np.any(found.fields["keypoints"]) and found.fields["faces"] == [[]] * 8
    assert pose_tier(found.scores, THRESHOLDS) == "none"


def test_face_mesh_mouth_opens_with_the_drawn_mouth(closeup):
    drawn, found = closeup
    opening = found.signals["mouth_opening"]
    assert np.isfinite(opening).all()
    assert np.corrcoef(opening, drawn.mouth)[0, 1] > 0.9  # measured 0.98
    assert found.methods["lip_sync"] == "proxy_mouth_opening"
    assert found.scores["lip_sync"] > 0.9 and found.scores["lip_sync_offset"] == 0.0
    assert found.scores["speech_fraction"] > THRESHOLDS.audio_strong_speech_fraction
    assert audio_tier(found.scores, THRESHOLDS) == "strong"


def test_unrelated_voices_do_not_make_the_lips_audio_strong(closeup):
    """The close-up's mouth track against 40 other voices of the same kind (seeds 100-139),
    its face and speech scores kept. Measured: r >= audio_strong_lip_sync (0.3), the whole
    lip rule before the chance check, for 20 of 40 (median r 0.31, best 0.70): 3.6 s at 8 fps
    are few, smooth frames and the best of 5 offsets is taken. With lip_sync_p <= 0.01 as
    well, 0 of 40 (smallest p 0.023, r 0.55), while the mouth's own voice has r 0.96,
    p 2e-8. Over 300 such voices the chance rule passes 2.3 %, so at most 1 of 40 is allowed
    for another MediaPipe build's slightly different mesh."""
    drawn, found = closeup
    mouth = found.signals["mouth_opening"]
    assert found.scores["lip_sync_p"] < 1e-6 and audio_tier(found.scores, THRESHOLDS) == "strong"
    unrelated, by_r_alone, strong = [], 0, 0
    for seed in range(100, 140):
        other = synthetic_voice(np.random.default_rng(seed), len(drawn.audio) / RATE, RATE)
        dubbed = Findings(signals={"mouth_opening": mouth})
        LipSync()(_clip(drawn.frames, other), dubbed)
        unrelated.append(dubbed.scores["lip_sync"])
        by_r_alone += dubbed.scores["lip_sync"] >= THRESHOLDS.audio_strong_lip_sync
        strong += audio_tier({**found.scores, **dubbed.scores}, THRESHOLDS) == "strong"
    assert by_r_alone >= 15  # a hard set: r alone cannot tell these voices from the own one
    assert strong <= 1
    assert found.scores["lip_sync"] > max(unrelated) + 0.2
