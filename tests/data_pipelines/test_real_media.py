"""The real annotators on real media (../shared/data): the issue's "done when" checks.

No file there pairs a face with its own voice (carphone.mp4 has no audio track, the speech
has no picture), so the only real-media audio case is the negative: carphone with someone
else's speech. The positive audio-strong case is the drawn close-up whose lips follow its
voice (test_annotator_models.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipelines.annotators import ClipView, Findings
from data_pipelines.annotators.audio import SpeechActivity
from data_pipelines.annotators.lipsync import LipSync
from data_pipelines.config import ShardConfig
from data_pipelines.figure import J
from data_pipelines.media import encode_mp4, resample_audio
from data_pipelines.pipeline import run_shard
from data_pipelines.tags import audio_tier
from data_pipelines.testing import decode_mp4, shard_members
from data_pipelines.voice import read_wav

pytest.importorskip("mediapipe")
pytest.importorskip("silero_vad")
cv2 = pytest.importorskip("cv2")


def _shard_one(video: Path, tmp_path: Path, **overrides) -> dict:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / video.name).write_bytes(video.read_bytes())
    run_shard(ShardConfig(input_dir=str(inputs), output_dir=str(tmp_path / "out"), **overrides))
    (members,) = shard_members(tmp_path / "out").values()
    return {"meta": json.loads(members["json"]), "mp4": members["mp4"]}


@pytest.fixture(scope="module")
def carphone(shared_data, tmp_path_factory) -> dict:
    return _shard_one(shared_data / "carphone.mp4", tmp_path_factory.mktemp("carphone"))


def test_carphone_has_a_face_and_a_body_pose(carphone):
    meta = carphone["meta"]
    scores, methods = meta["quality"]["scores"], meta["quality"]["methods"]
    assert methods["face"].startswith("mediapipe") and methods["pose"].startswith("mediapipe")
    assert scores["face_fraction"] == 1.0 and scores["face_count_max"] == 1.0
    assert 0.05 < scores["face_area"] < 0.5  # head and shoulders in a car
    assert all(len(boxes) == 1 for boxes in meta["faces"])
    keypoints = np.asarray(meta["keypoints"])
    assert keypoints.shape == (meta["num_frames"], 17, 3) and meta["keypoints_format"] == "coco17"
    assert scores["head_visibility"] == 1.0  # nose and eyes in every frame
    visible = keypoints[..., 2] >= 0.5
    assert visible[:, 5:7].all()  # both shoulders
    assert not visible[:, 13:].any()  # knees and ankles are below the frame
    nose, shoulders = keypoints[:, 0, :2].mean(0), keypoints[:, 5:7, :2].mean((0, 1))
    assert nose[1] < shoulders[1]  # the head is above the shoulders
    assert meta["quality"]["pose"] == "weak"  # half the body: usable, not for pose-strong
    assert len(meta["hands"]) == meta["num_frames"] and meta["hands_format"] == "mediapipe21"


def test_carphone_without_audio_is_audio_none_ref_strong(carphone):
    meta = carphone["meta"]
    assert meta["has_audio"] is False and "speech_fraction" not in meta["quality"]["scores"]
    assert meta["quality"]["audio"] == "none" and meta["quality"]["ref"] == "strong"
    assert meta["quality"]["text"] == "weak" and meta["quality"]["methods"]["caption"] == "none"
    frames, audio, _ = decode_mp4(carphone["mp4"])
    assert audio is None and frames.shape == (24, 130, 160, 3)


# messi5.jpg (548 x 342): the player's joint centres and face centre, read off the photo by
# eye (pixels). A wide stance with the arms out: left and right lie 135-250 px apart.
MESSI_JOINTS = {
    "nose": (246, 120), "left_wrist": (350, 160), "right_wrist": (102, 100),
    "left_knee": (360, 250), "right_knee": (225, 280),
    "left_ankle": (425, 265), "right_ankle": (280, 318),
}  # fmt: skip
MESSI_FACE = (242, 112)
PAN_WIDTH, PAN_FRAMES = 496, 24
# Measured over the panned frames: joints 3-13 px off on average, 33 px at worst (the left
# knee in one frame); the face box centre 0-4 px off.
JOINT_MAX_ERROR, JOINT_MEAN_ERROR, FACE_ERROR = 45.0, 20.0, 12.0


@pytest.fixture(scope="module")
def messi_pan(shared_data, tmp_path_factory) -> tuple[dict, np.ndarray]:
    """3 s at 8 fps of a camera panning 52 px across messi5.jpg, the whole player in every
    frame: the sharded sample's json and each frame's left edge in the photo."""
    photo = cv2.cvtColor(cv2.imread(str(shared_data / "messi5.jpg")), cv2.COLOR_BGR2RGB)
    lefts = np.linspace(0, photo.shape[1] - PAN_WIDTH, PAN_FRAMES).round().astype(int)
    frames = np.stack([photo[:, left : left + PAN_WIDTH] for left in lefts])
    video = tmp_path_factory.mktemp("messi") / "messi_pan.mp4"
    video.write_bytes(encode_mp4(frames, 8.0))
    meta = _shard_one(video, tmp_path_factory.mktemp("messi_shard"))["meta"]
    return meta, lefts


def test_a_panned_full_body_photo_is_pose_strong(messi_pan):
    meta, _ = messi_pan
    quality, thresholds = meta["quality"], ShardConfig().thresholds
    assert meta["num_frames"] == PAN_FRAMES and meta["keypoints_format"] == "coco17"
    assert quality["methods"]["pose"] == "mediapipe_holistic_1"
    assert quality["scores"]["pose_visibility"] >= thresholds.pose_strong_visibility
    assert quality["scores"]["pose_jitter"] <= thresholds.pose_strong_max_jitter
    assert quality["pose"] == "strong" and quality["ref"] == "strong"
    assert quality["audio"] == "none"  # no audio track


def test_holistic_finds_the_players_joints_where_the_photo_has_them(messi_pan):
    meta, lefts = messi_pan
    keypoints, height = np.asarray(meta["keypoints"]), 342
    for name, (x, y) in MESSI_JOINTS.items():
        joint = keypoints[:, J[name]]
        assert (joint[:, 2] >= 0.5).all(), name
        errors = np.hypot(joint[:, 0] * PAN_WIDTH + lefts - x, joint[:, 1] * height - y)
        assert errors.max() <= JOINT_MAX_ERROR and errors.mean() <= JOINT_MEAN_ERROR, (
            name, errors.round(1),
        )  # fmt: skip
    assert all(len(boxes) == 1 for boxes in meta["faces"])
    box = np.array([boxes[0][:4] for boxes in meta["faces"]])
    centre_x = (box[:, 0] + box[:, 2] / 2) * PAN_WIDTH + lefts
    centre_y = (box[:, 1] + box[:, 3] / 2) * height
    assert np.hypot(centre_x - MESSI_FACE[0], centre_y - MESSI_FACE[1]).max() <= FACE_ERROR


def test_silero_finds_speech_where_the_transcript_has_it(shared_data):
    audio, rate = read_wav(shared_data / "speech_sample.wav")
    probabilities = SpeechActivity(backend="silero").speech_probabilities(audio, rate)
    seconds = np.arange(len(probabilities)) * 0.032
    voiced = probabilities >= 0.5
    assert not voiced[seconds < 6.5].any()  # the transcript starts at 6.68 s
    assert 6.6 < seconds[voiced][0] < 7.2
    assert voiced[seconds > 7.0].mean() > 0.6


def test_carphone_with_someone_elses_speech_is_not_audio_strong(shared_data, tmp_path):
    frames = np.stack(
        [
            f.to_ndarray(format="rgb24")
            for f in av.open(str(shared_data / "carphone.mp4")).decode(video=0)
        ]
    )
    audio, rate = read_wav(shared_data / "speech_sample.wav")
    speech = audio[round(7.0 * rate) : round(11.1 * rate)]  # speech all through
    muxed = tmp_path / "carphone_speech.mp4"
    muxed.write_bytes(encode_mp4(frames, 30000 / 1001, speech, rate))
    meta = _shard_one(muxed, tmp_path)["meta"]
    scores, methods = meta["quality"]["scores"], meta["quality"]["methods"]
    assert scores["speech_fraction"] > 0.6 and methods["speech"] == "silero_vad"
    assert scores["face_fraction"] == 1.0  # a visible face, loud speech ...
    assert methods["lip_sync"] == "proxy_mouth_opening"  # labelled: not Sync-C
    thresholds = ShardConfig().thresholds
    assert scores["lip_sync"] < thresholds.audio_strong_lip_sync  # ... no match
    assert scores["lip_sync_p"] > thresholds.audio_strong_lip_sync_max_p  # nor by chance
    assert meta["quality"]["audio"] == "weak"


@pytest.fixture(scope="module")
def carphone_mouth(shared_data) -> np.ndarray:
    """carphone.mp4's mouth opening over its first 3 s, decoded as the shard job does."""
    from data_pipelines.annotators.body import BodyPose
    from data_pipelines.decoding import DamageLog, video_frames

    cfg = ShardConfig()
    decoded = video_frames(shared_data / "carphone.mp4", cfg.fps, cfg.max_side, DamageLog(), 1.0)
    frames = np.stack([frame.image for frame in decoded])[: round(cfg.clip_seconds * cfg.fps)]
    found = Findings()
    BodyPose(backend="mediapipe", use_sidecar=False)(_view(frames, None, cfg.fps), found)
    return found.signals["mouth_opening"]


def _view(frames: np.ndarray, audio: np.ndarray | None, fps: float) -> ClipView:
    return ClipView(
        source="carphone.mp4", path=Path("carphone.mp4"), frames=frames, fps=fps, audio=audio,
        sample_rate=16000, start=0.0, end=len(frames) / fps,
    )  # fmt: skip


def test_carphone_lips_are_not_audio_strong_with_windows_of_someone_elses_speech(
    shared_data, carphone_mouth
):
    """The lips against 38 windows of speech_sample.wav (3 s each, every 0.5 s from 7.0 s),
    a visible face and loud speech assumed. Measured: r >= audio_strong_lip_sync (0.3), the
    whole lip rule before the chance check, in 11 of 38 (r up to 0.83); with lip_sync_p <=
    0.01 as well, in 1: the window from 20.5 s, whose two loudest frames fall on the mouth's
    one wide opening (frames 15-16; r 0.83, p 2e-5), a coincidence this short clip cannot
    tell from lips that follow the voice."""
    thresholds = ShardConfig().thresholds
    audio, rate = read_wav(shared_data / "speech_sample.wav")
    speech = resample_audio(audio, rate, 16000)
    seen = {"speech_fraction": 1.0, "loudness_dbfs": -20.0, "face_fraction": 1.0}
    by_r_alone, strong = 0, []
    for start in 7.0 + 0.5 * np.arange(38):
        window = speech[round(start * 16000) : round((start + 3.0) * 16000)]
        found = Findings(signals={"mouth_opening": carphone_mouth})
        LipSync()(_view(np.zeros((len(carphone_mouth), 8, 8, 3), np.uint8), window, 8.0), found)
        by_r_alone += found.scores["lip_sync"] >= thresholds.audio_strong_lip_sync
        if audio_tier({**seen, **found.scores}, thresholds) == "strong":
            strong.append(float(start))
    assert by_r_alone >= 8  # r alone would call these lips someone else's
    assert strong == [20.5]


@pytest.mark.slow
def test_models_give_the_same_bytes_in_any_worker(sample, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("clip00_wave.mp4", "clip03_closeup.mp4"):
        (corpus / name).write_bytes((sample.corpus / name).read_bytes())
    nodes = ShardConfig().annotators
    models = {**nodes, **{n: {**nodes[n], "backend": "mediapipe", "use_sidecar": False}
                          for n in ("pose", "face")}}  # fmt: skip
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(out), workers=workers,
                              annotators=models, max_samples_per_shard=1))  # fmt: skip
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes()
                        for p in sorted(out.rglob("*")) if p.is_file()})  # fmt: skip
    assert outputs[0] == outputs[1]
    metas = [json.loads(m["json"]) for m in shard_members(tmp_path / "out1").values()]
    assert all(m["quality"]["methods"]["pose"].startswith("mediapipe") for m in metas)


def test_real_speech_with_a_damaged_audio_packet_keeps_its_audio_and_tags(shared_data, tmp_path):
    from data_pipelines.damaged_media import overwrite_packets, packet_layout

    frames = np.stack(
        [
            f.to_ndarray(format="rgb24")
            for f in av.open(str(shared_data / "carphone.mp4")).decode(video=0)
        ]
    )
    audio, rate = read_wav(shared_data / "speech_sample.wav")
    speech = audio[round(7.0 * rate) : round(11.1 * rate)]
    muxed = tmp_path / "carphone_speech_damaged.mp4"
    muxed.write_bytes(encode_mp4(frames, 30000 / 1001, speech, rate))
    audio_packets = [p for p in packet_layout(muxed) if p.stream_type == "audio"]
    middle = audio_packets[len(audio_packets) // 2]
    overwrite_packets(muxed, [middle], seed=0)  # one AAC packet, mid-speech, undecodable
    meta = _shard_one(muxed, tmp_path)["meta"]
    scores, quality = meta["quality"]["scores"], meta["quality"]
    assert meta["has_audio"] is True
    assert meta["damage"]["audio_packets_dropped"] == 1
    assert 0 < meta["damage"]["audio_seconds_dropped"] <= 0.07  # one 1024-sample AAC frame
    assert scores["speech_fraction"] > 0.6 and quality["methods"]["speech"] == "silero_vad"
    assert quality["audio"] == "weak"  # tagged on the measured speech, as undamaged above
