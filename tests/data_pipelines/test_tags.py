from __future__ import annotations

import pytest

from data_pipelines.config import TagThresholds
from data_pipelines.tags import condition_tiers
from omni_train.contracts import CONDITIONS, TIERS

T = TagThresholds()
IMAGE = {"sharpness": 200.0, "motion": 0.02, "contrast": 30.0, "brightness": 0.5}
SPEECH = {"speech_fraction": 0.7, "loudness_dbfs": -20.0}
POSE = {"pose_visibility": 1.0, "head_visibility": 1.0, "pose_jitter": 0.001,
        "keypoint_motion": 0.01}  # fmt: skip
LIPS = {"lip_sync": 0.8, "lip_sync_p": 0.001}  # lips that follow the voice, not by chance


@pytest.mark.parametrize(
    ("scores", "caption", "expected"),
    [
        # everything good
        (
            {**IMAGE, **SPEECH, **POSE, **LIPS},
            "a man talks",
            {"text": "strong", "ref": "strong", "audio": "strong", "pose": "strong"},
        ),
        # no caption: text still trains (as an empty prompt), weakly
        (
            {**IMAGE, **SPEECH, **POSE, **LIPS},
            "   ",
            {"text": "weak", "ref": "strong", "audio": "strong", "pose": "strong"},
        ),
        # no audio track, no keypoints
        (IMAGE, "x", {"text": "strong", "ref": "strong", "audio": "none", "pose": "none"}),
        # speech but no keypoints: nothing shows a speaking face -> at most weak
        (
            {**IMAGE, **SPEECH},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "none"},
        ),
        # speech, head visible, but the mouth does not follow the voice (voice-over)
        (
            {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.05},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # r as high, but short smooth signals reach it by chance one time in 20
        (
            {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.8, "lip_sync_p": 0.05},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # r without its chance p (scores written before lip_sync_p): no evidence
        (
            {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.8},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # not by chance, but too weak a match
        (
            {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.25, "lip_sync_p": 0.001},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # speech, lips unmeasurable (no lip_sync score)
        (
            {**IMAGE, **SPEECH, **POSE},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # head out of frame half the time
        (
            {**IMAGE, **SPEECH, **POSE, **LIPS, "head_visibility": 0.5},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # a track that is present but near-silent
        (
            {**IMAGE, "speech_fraction": 0.0, "loudness_dbfs": -66.0, **POSE},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "strong"},
        ),
        # loud but hardly any speech (e.g. one bang)
        (
            {**IMAGE, "speech_fraction": 0.05, "loudness_dbfs": -20.0, **POSE, **LIPS},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "strong"},
        ),
        # some speech, below the strong fraction
        (
            {**IMAGE, "speech_fraction": 0.2, "loudness_dbfs": -25.0, **POSE, **LIPS},
            "x",
            {"text": "strong", "ref": "strong", "audio": "weak", "pose": "strong"},
        ),
        # frozen clip: sharp but no motion of pixels or joints -> ref weak
        (
            {**IMAGE, "motion": 0.001, **POSE, "keypoint_motion": 0.0001},
            "x",
            {"text": "strong", "ref": "weak", "audio": "none", "pose": "strong"},
        ),
        # pixels barely change but the joints move -> ref strong
        (
            {**IMAGE, "motion": 0.001, **POSE},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "strong"},
        ),
        # soft focus
        (
            {**IMAGE, "sharpness": 10.0},
            "x",
            {"text": "strong", "ref": "none", "audio": "none", "pose": "none"},
        ),
        (
            {**IMAGE, "sharpness": 40.0},
            "x",
            {"text": "strong", "ref": "weak", "audio": "none", "pose": "none"},
        ),
        # legs out of frame -> pose weak; most joints missing -> none
        (
            {**IMAGE, **POSE, "pose_visibility": 0.5},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "weak"},
        ),
        (
            {**IMAGE, **POSE, "pose_visibility": 0.2},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "none"},
        ),
        # jittery keypoints
        (
            {**IMAGE, **POSE, "pose_jitter": 0.04},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "weak"},
        ),
        (
            {**IMAGE, **POSE, "pose_jitter": 0.2},
            "x",
            {"text": "strong", "ref": "strong", "audio": "none", "pose": "none"},
        ),
    ],
)
def test_condition_tiers(scores, caption, expected):
    assert condition_tiers(scores, caption, T) == expected


def test_thresholds_come_from_config():
    scores = {**IMAGE, **POSE, "pose_visibility": 0.8}
    assert condition_tiers(scores, "x", T)["pose"] == "weak"
    lenient = TagThresholds(pose_strong_visibility=0.75)
    assert condition_tiers(scores, "x", lenient)["pose"] == "strong"
    assert condition_tiers(scores, "ab", TagThresholds(text_strong_min_chars=3))["text"] == "weak"


def test_lip_sync_chance_check_is_a_threshold():
    by_chance = {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.8, "lip_sync_p": 0.05}
    assert condition_tiers(by_chance, "x", T)["audio"] == "weak"
    lenient = TagThresholds(audio_strong_lip_sync_max_p=0.1)
    assert condition_tiers(by_chance, "x", lenient)["audio"] == "strong"
    # 1.0 drops the check: r alone decides, as for scores stored without a p
    off = TagThresholds(audio_strong_lip_sync_max_p=1.0)
    r_only = {**IMAGE, **SPEECH, **POSE, "lip_sync": 0.8}
    assert condition_tiers(r_only, "x", off)["audio"] == "strong"
    for wrong in (0.0, -0.01, 5.0):
        with pytest.raises(ValueError, match="audio_strong_lip_sync_max_p.*in \\(0, 1\\]"):
            TagThresholds(audio_strong_lip_sync_max_p=wrong)


def test_tiers_are_always_valid():
    for result in (condition_tiers({}, "", T), condition_tiers({**IMAGE, **SPEECH}, "c", T)):
        assert set(result) == set(CONDITIONS)
        assert set(result.values()) <= set(TIERS)


def test_detector_scores_decide_when_present():
    frozen = {**IMAGE, "motion": 0.001}
    assert condition_tiers({**frozen, "flow_motion": 0.01}, "x", T)["ref"] == "strong"
    assert condition_tiers({**frozen, "flow_motion": 0.0005}, "x", T)["ref"] == "weak"
    # a detector looked and found nobody: not a usable reference
    nobody = {**IMAGE, "face_fraction": 0.0, "pose_visibility": 0.0, "head_visibility": 0.0}
    assert condition_tiers(nobody, "x", T)["ref"] == "weak"
    speaks = {**IMAGE, **SPEECH, **LIPS}
    # the face detector outranks head keypoints for the visible-face rule
    assert condition_tiers({**speaks, "face_fraction": 1.0}, "x", T)["audio"] == "strong"
    hidden = {**speaks, **POSE, "face_fraction": 0.2}
    assert condition_tiers(hidden, "x", T)["audio"] == "weak"
