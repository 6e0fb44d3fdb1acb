from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import measures
from data_pipelines.annotations import PoseTrack
from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.annotators.audio import Loudness, SpeechActivity, integrated_loudness
from data_pipelines.annotators.base import optional_import, run_timed
from data_pipelines.annotators.face import FaceDetector
from data_pipelines.annotators.image import Motion
from data_pipelines.annotators.lipsync import LipSync, best_offset_correlation, chance_p_value
from data_pipelines.config import default_annotators

RATE = 16000
REPO = Path(__file__).resolve().parents[2]


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
    assert found.scores["lip_sync_p"] < 1e-6  # 32 frames that open and shut with the voice


def _smooth_noise(rng: np.random.Generator, frames: int, phi: float) -> np.ndarray:
    """AR(1): x[t] = phi x[t-1] + white noise, stationary from the first frame."""
    x = np.empty(frames)
    x[0] = rng.standard_normal() / np.sqrt(1 - phi**2)
    for t in range(1, frames):
        x[t] = phi * x[t - 1] + rng.standard_normal()
    return x


def test_chance_p_keeps_its_rate_on_smooth_unrelated_signals():
    """1000 pairs of independent smooth signals of 24 frames (AR(1), phi 0.6, about as smooth
    as a mouth track at 8 fps). Measured: p <= 0.01 for 0.8 % of them (0.8 % for white noise
    too). Fisher's z over 24 frames, as if each frame were independent, gives 5.3 %."""
    rng = np.random.default_rng(0)
    p_values = []
    for _ in range(1000):
        mouth, envelope = _smooth_noise(rng, 24, 0.6), _smooth_noise(rng, 24, 0.6)
        p_values.append(chance_p_value(mouth, envelope, np.corrcoef(mouth, envelope)[0, 1], 1))
    assert np.mean(np.array(p_values) <= 0.01) <= 0.015


def test_chance_p_counts_offsets_and_skips_frames_without_a_mouth():
    rng = np.random.default_rng(3)
    mouth, envelope = _smooth_noise(rng, 30, 0.5), _smooth_noise(rng, 30, 0.5)
    one = chance_p_value(mouth, envelope, 0.5, 1)
    # The best of 5 offsets: Sidak, as likely as one of 5 tries reaching r.
    assert chance_p_value(mouth, envelope, 0.5, 5) == pytest.approx(1 - (1 - one) ** 5)
    assert chance_p_value(mouth, envelope, 0.7, 1) < one < chance_p_value(mouth, envelope, 0.3, 1)
    # White noise: N* = N frames, so p is Fisher's z over all of them, at most.
    noise = rng.standard_normal((2, 200))
    fisher = 0.5 * math.erfc(math.atanh(0.2) * math.sqrt(200 - 3) / math.sqrt(2))
    assert chance_p_value(noise[0], noise[1], 0.2, 1) == pytest.approx(fisher, rel=0.3)
    # The same signal twice: every lag counts, far fewer independent frames than 30.
    assert chance_p_value(mouth, mouth, 0.5, 1) > one
    hidden = mouth.copy()
    hidden[::3] = np.nan  # no face mesh in a third of the frames
    assert chance_p_value(hidden, envelope, 0.5, 1) > one  # fewer frames, less evidence
    assert chance_p_value(np.full(30, np.nan), envelope, 0.5, 1) == 1.0


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


# ------------------------------------------------------- shared views change no score
def _preset(name: str) -> dict:
    """default_annotators() with conf/annotators/NAME.yaml merged over it, as Hydra does."""
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "annotators" / f"{name}.yaml"))
    nodes = default_annotators()
    for key, node in preset.items():
        if key != "defaults":
            nodes[key] = {**nodes[key], **node}
    return nodes


def _figure_clip(sidecar: bool) -> ClipView:
    from data_pipelines.config import SampleCorpusConfig
    from data_pipelines.sample_corpus import render_clip
    from data_pipelines.scenes import plan_clip

    frames, audio, keypoints = render_clip(
        plan_clip(0, 0), SampleCorpusConfig(out_dir="unused", fps=8)
    )
    pose = PoseTrack(np.asarray(keypoints, np.float32), 8.0) if sidecar else None
    return _clip(frames, audio, 8.0, sidecar_pose=pose)


def _annotate(clip: ClipView, nodes: dict) -> Findings:
    found = Findings()
    for annotator in build_annotators(nodes):
        run_timed(annotator, clip, found)
    return found


def _uncached_image_scores(frames: np.ndarray) -> dict[str, float]:
    return {
        "sharpness": measures.sharpness(frames),
        "contrast": measures.contrast(frames),
        "brightness": measures.brightness(frames),
        "motion": measures.motion(frames),
    }


def test_light_preset_scores_are_the_uncached_ones():
    clip = _figure_clip(sidecar=True)
    found = _annotate(clip, _preset("light"))
    expected = _uncached_image_scores(clip.frames)
    assert {name: found.scores[name] for name in expected} == expected  # to the bit
    keypoints = found.signals["keypoints"]
    assert found.methods["lip_sync"] == "proxy_mouth_darkness"
    assert found.scores["lip_sync"] == measures.lip_sync(
        clip.frames, keypoints, clip.audio, RATE, 8.0
    )
    darkness = measures.mouth_darkness(clip.frames, keypoints)
    energy = measures.frame_rms(clip.audio, RATE, 8.0, len(clip.frames))
    assert found.scores["lip_sync_p"] == chance_p_value(
        darkness, energy, found.scores["lip_sync"], num_offsets=1
    )
    assert set(found.seconds) == {a.name for a in build_annotators(_preset("light"))}
    assert all(seconds >= 0 for seconds in found.seconds.values())
    # The grey view is computed once and cannot be written to by an annotator.
    assert clip.grey is clip.grey and not clip.grey.flags.writeable
    np.testing.assert_array_equal(clip.grey, measures.grey(clip.frames))


def test_full_preset_scores_are_the_uncached_ones():
    cv2 = pytest.importorskip("cv2")
    for package in ("mediapipe", "silero_vad"):
        pytest.importorskip(package)
    nodes = _preset("full")
    assert nodes["pose"]["every_n_frames"] == 1 and nodes["face"]["every_n_frames"] == 1
    clip = _figure_clip(sidecar=False)
    found = _annotate(clip, nodes)
    expected = _uncached_image_scores(clip.frames)
    assert {name: found.scores[name] for name in expected} == expected
    # Farneback flow from grey frames converted here, as the annotator did before sharing.
    grey = measures.grey(clip.frames).clip(0, 255).astype(np.uint8)
    pairs = np.unique(np.linspace(0, len(grey) - 2, min(48, len(grey) - 1)).round()).astype(int)
    flows = [cv2.calcOpticalFlowFarneback(grey[k], grey[k + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
             for k in pairs]  # fmt: skip
    magnitudes = [float(np.linalg.norm(flow, axis=-1).mean()) for flow in flows]
    assert found.scores["flow_motion"] == float(np.mean(magnitudes)) / float(np.hypot(96, 128))
    assert found.methods["pose"] == "mediapipe_holistic_1"
    assert found.methods["face"] == "mediapipe_face_detection_1"
    assert len(found.fields["faces"]) == len(found.fields["keypoints"]) == len(clip.frames)
    again = _annotate(_figure_clip(sidecar=False), nodes)
    assert again.scores == found.scores and again.fields == found.fields
