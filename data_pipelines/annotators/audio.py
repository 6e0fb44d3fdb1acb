"""Audio annotators: speech activity (Silero VAD or an energy detector) and loudness."""

from __future__ import annotations

import numpy as np

from data_pipelines import measures
from data_pipelines.annotators.base import ClipView, Findings, optional_import, warn_once
from data_pipelines.media import resample_audio

VAD_BACKENDS = ("auto", "silero", "energy")
SILERO_RATE = 16000
SILERO_CHUNK = 512  # samples per Silero probability at 16 kHz (32 ms)


class SpeechActivity:
    """``speech_fraction``: the fraction of the clip the detector marks as voice.

    backend: silero (the Silero VAD network shipped in the silero-vad wheel, per-32 ms speech
    probability >= ``threshold``), energy (hops well above the source's noise floor, see
    measures.voice_activity, with the shard's ``vad`` settings) or auto (silero when installed, else energy, with a warning).
    """

    name = "speech"

    def __init__(self, backend: str = "auto", threshold: float = 0.5) -> None:
        if backend not in VAD_BACKENDS:
            raise ValueError(f"annotators.speech.backend={backend!r}: use one of {VAD_BACKENDS}")
        self.threshold = threshold
        self._silero = None
        if backend != "energy":
            self._silero = optional_import(
                "silero_vad", "speech backend=silero", backend == "silero"
            )
            if self._silero is None:
                warn_once("silero-vad is not installed: speech activity uses the energy detector")
        self._model = None
        self.resolved = "energy" if self._silero is None else "silero"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        if clip.audio is None:
            return
        if self._silero is None:
            found.scores["speech_fraction"] = measures.speech_fraction(
                clip.audio, clip.sample_rate, clip.vad, clip.floor_dbfs
            )
            found.methods["speech"] = "energy"
            return
        probabilities = self.speech_probabilities(clip.audio, clip.sample_rate)
        voiced = probabilities >= self.threshold
        found.scores["speech_fraction"] = float(voiced.mean()) if len(voiced) else 0.0
        found.methods["speech"] = "silero_vad"

    def speech_probabilities(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Silero's speech probability per 32 ms chunk of ``audio``."""
        import torch

        if self._model is None:
            self._model = self._silero.load_silero_vad()
        audio = resample_audio(audio, sample_rate, SILERO_RATE)
        if len(audio) < SILERO_CHUNK:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            out = self._model.audio_forward(
                torch.from_numpy(np.ascontiguousarray(audio)), SILERO_RATE
            )
        return out[0].numpy().astype(np.float32)


class Loudness:
    """``loudness_dbfs`` (RMS) and ``loudness_lufs`` (ITU-R BS.1770 K-weighted, gated)."""

    name = "loudness"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        if clip.audio is None:
            return
        found.scores["loudness_dbfs"] = measures.loudness_dbfs(clip.audio)
        found.scores["loudness_lufs"] = integrated_loudness(clip.audio, clip.sample_rate)
        found.methods["loudness"] = "rms_and_bs1770"


def _biquad_power(b: np.ndarray, a: np.ndarray, omega: np.ndarray) -> np.ndarray:
    z = np.exp(-1j * omega)
    return np.abs((b[0] + b[1] * z + b[2] * z**2) / (a[0] + a[1] * z + a[2] * z**2)) ** 2


def k_weighting_power(sample_rate: int, num_bins: int, n: int) -> np.ndarray:
    """|H(f)|^2 of the BS.1770 K-weighting (high shelf then high pass) at the rfft bins of an
    n-sample block, designed for ``sample_rate`` (the standard gives 48 kHz coefficients;
    these are the same analog filters bilinear-transformed at this rate)."""
    omega = 2 * np.pi * np.arange(num_bins) / n
    # Stage 1: +4 dB high shelf around 1.5 kHz, Q = 1/sqrt(2).
    gain = 10 ** (4.0 / 40)
    w0 = 2 * np.pi * 1500.0 / sample_rate
    alpha = np.sin(w0) / (2 * (1 / np.sqrt(2)))
    cos, root = np.cos(w0), 2 * np.sqrt(gain) * alpha
    b = gain * np.array([(gain + 1) + (gain - 1) * cos + root, -2 * ((gain - 1) + (gain + 1) * cos),
                         (gain + 1) + (gain - 1) * cos - root])  # fmt: skip
    a = np.array([(gain + 1) - (gain - 1) * cos + root, 2 * ((gain - 1) - (gain + 1) * cos),
                  (gain + 1) - (gain - 1) * cos - root])  # fmt: skip
    shelf = _biquad_power(b, a, omega)
    # Stage 2: high pass at 38 Hz, Q = 0.5.
    w0 = 2 * np.pi * 38.0 / sample_rate
    alpha, cos = np.sin(w0) / (2 * 0.5), np.cos(w0)
    b = np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2])
    a = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return shelf * _biquad_power(b, a, omega)


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Gated loudness in LUFS of mono audio: 400 ms blocks, 75 % overlap, -70 LUFS absolute
    gate, -10 LU relative gate. The K-weighted block power comes from the block's spectrum
    (Parseval), so no IIR filtering runs sample by sample. Silence gives -120."""
    block = round(0.4 * sample_rate)
    if len(audio) < block:
        block = len(audio)
    if block < 16:
        return measures.SILENCE_DBFS
    hop = max(1, block // 4)
    starts = np.arange(0, len(audio) - block + 1, hop)
    blocks = np.stack([audio[s : s + block] for s in starts]).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(blocks, axis=1)) ** 2
    weights = np.full(spectrum.shape[1], 2.0)
    weights[0] = 1.0
    if block % 2 == 0:
        weights[-1] = 1.0
    power = (spectrum * weights * k_weighting_power(sample_rate, spectrum.shape[1], block)).sum(
        axis=1
    ) / (block * block)
    loudness = -0.691 + 10 * np.log10(np.maximum(power, 1e-20))
    gated = power[loudness > -70.0]
    if not len(gated):
        return measures.SILENCE_DBFS
    relative = -0.691 + 10 * np.log10(gated.mean()) - 10.0
    gated = gated[-0.691 + 10 * np.log10(gated) > relative]
    return float(max(measures.SILENCE_DBFS, -0.691 + 10 * np.log10(gated.mean())))
