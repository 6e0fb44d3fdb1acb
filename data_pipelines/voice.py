"""Speech-like audio for the sample corpus: espeak-ng when installed, else a formant voice.

The synthetic voice is a glottal pulse train at a slowly varying pitch, shaped by three
formant resonators per vowel, cut into syllables (4-6 per second) grouped into words with
pauses between them, so an energy-based voice detector sees speech and silence.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from data_pipelines.media import resample_audio

log = logging.getLogger(__name__)

# (F1, F2, F3) in Hz with bandwidths, roughly an adult speaker's /a e i o u/.
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410),
          (300, 870, 2240))  # fmt: skip
BANDWIDTHS = (90.0, 110.0, 170.0)
SENTENCES = (
    "hello there, this is a short sample of speech for the training data",
    "the weather is bright today and we are walking in the park",
    "please listen carefully, the next part of the story begins now",
    "one two three four five, counting slowly for the microphone",
)


def synthetic_voice(rng: np.random.Generator, seconds: float, sample_rate: int) -> np.ndarray:
    """Float32 mono in [-1, 1]: words of 1-4 syllables separated by 0.15-0.45 s pauses."""
    total = round(seconds * sample_rate)
    out = np.zeros(total, np.float32)
    base_pitch = float(rng.uniform(100, 210))
    position = int(rng.uniform(0.05, 0.25) * sample_rate)
    while position < total:
        for _ in range(int(rng.integers(1, 5))):
            length = int(rng.uniform(0.14, 0.24) * sample_rate)
            if position + length > total:
                break
            vowel = VOWELS[int(rng.integers(len(VOWELS)))]
            out[position : position + length] += _syllable(
                rng, length, vowel, base_pitch, sample_rate
            )
            position += length
        position += int(rng.uniform(0.15, 0.45) * sample_rate)
    peak = float(np.abs(out).max())
    return out * (0.5 / peak) if peak > 0 else out


def _syllable(
    rng: np.random.Generator,
    length: int,
    formants: tuple[int, int, int],
    base_pitch: float,
    sample_rate: int,
) -> np.ndarray:
    t = np.arange(length, dtype=np.float32) / sample_rate
    pitch = base_pitch * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6)))
    phase = np.cumsum(pitch / sample_rate)
    # One glottal pulse (a smoothed impulse) per pitch period.
    pulses = np.diff(np.floor(phase), prepend=0.0).astype(np.float32)
    pulses = np.convolve(pulses, np.hanning(9).astype(np.float32), mode="same")
    response_t = np.arange(int(0.025 * sample_rate), dtype=np.float32) / sample_rate
    response = sum(
        np.exp(-np.pi * bw * response_t) * np.sin(2 * np.pi * f * response_t) / (i + 1)
        for i, (f, bw) in enumerate(zip(formants, BANDWIDTHS, strict=True))
    )
    voiced = np.convolve(pulses, response, mode="full")[:length]
    # A short noise burst at the onset stands in for a consonant.
    burst = int(0.03 * sample_rate)
    voiced[:burst] += 0.3 * rng.standard_normal(burst).astype(np.float32) * np.abs(voiced).max()
    attack = np.minimum(1.0, np.arange(length) / (0.3 * length))
    release = np.minimum(1.0, (length - np.arange(length)) / (0.35 * length))
    return (voiced * attack * release).astype(np.float32)


def near_silence(rng: np.random.Generator, seconds: float, sample_rate: int) -> np.ndarray:
    """Room-tone noise around -66 dBFS RMS: an audio track with nothing said."""
    return (0.0005 * rng.standard_normal(round(seconds * sample_rate))).astype(np.float32)


def espeak_voice(
    text: str, seconds: float, sample_rate: int, offset: float = 0.2, executable: str = "espeak-ng"
) -> np.ndarray:
    """Speak ``text`` with espeak-ng into a wav, resample to ``sample_rate``, fit to length."""
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        subprocess.run(
            [executable, "-w", str(wav_path), "-s", "160", text],
            check=True,
            capture_output=True,
            timeout=30,
        )
        samples, rate = read_wav(wav_path)
    resampled = resample_audio(samples, rate, sample_rate)
    out = np.zeros(round(seconds * sample_rate), np.float32)
    start = round(offset * sample_rate)
    piece = resampled[: max(0, len(out) - start)]
    out[start : start + len(piece)] = piece
    peak = float(np.abs(out).max())
    return out * (0.5 / peak) if peak > 0 else out


def speech(rng: np.random.Generator, seconds: float, sample_rate: int, voice: str) -> np.ndarray:
    """Speech by the requested voice: "espeak", "synthetic" or "auto" (espeak if installed)."""
    if voice not in ("auto", "espeak", "synthetic"):
        raise ValueError(f"voice={voice!r}: use voice=auto, voice=espeak or voice=synthetic")
    executable = shutil.which("espeak-ng")
    if voice == "espeak" and executable is None:
        raise FileNotFoundError("voice=espeak needs espeak-ng on PATH; or use voice=synthetic")
    if voice != "synthetic" and executable is not None:
        text = SENTENCES[int(rng.integers(len(SENTENCES)))]
        return espeak_voice(text, seconds, sample_rate, executable=executable)
    return synthetic_voice(rng, seconds, sample_rate)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A PCM16 wav as float32 mono (channels averaged) and its sample rate."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * handle.getsampwidth()} bit")
        data = np.frombuffer(handle.readframes(handle.getnframes()), np.int16)
        channels, rate = handle.getnchannels(), handle.getframerate()
    return data.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0, rate


def frame_envelope(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """Per video frame RMS over that frame's span, scaled so the loudest frame is 1."""
    per_frame = sample_rate / fps
    rms = np.zeros(num_frames, np.float32)
    for i in range(num_frames):
        span = audio[round(i * per_frame) : round((i + 1) * per_frame)]
        rms[i] = np.sqrt(np.mean(span.astype(np.float64) ** 2)) if len(span) else 0.0
    peak = float(rms.max())
    return rms / peak if peak > 1e-3 else np.zeros_like(rms)
