"""Lip-sync: does the mouth move with the voice?

With ``syncnet_weights`` (a local path) a SyncNet scores the clip (``sync_c``,
``sync_distance``, ``sync_offset``; method ``syncnet``, see syncnet.py). Without weights, or
where SyncNet cannot score a clip (a frame without a detected face, too short), this is a
labelled PROXY, never to be read as Sync-C:
- ``proxy_mouth_opening``: the inner-lip gap from the face mesh (BodyPose with MediaPipe)
  against the audio envelope, Pearson r at the best offset within +-``max_offset_seconds``
  (the lips may lead or trail the sound); ``lip_sync_confidence`` is that best r minus the
  median r over all offsets, in the spirit of SyncNet's confidence.
- ``proxy_mouth_darkness``: with sidecar keypoints only, the darkness of the region below the
  nose (an open mouth is dark) against the audio energy (measures.lip_sync), at offset 0.
The method is recorded in the sample's ``quality.methods.lip_sync``.

Either proxy also records ``lip_sync_p``: how likely a mouth that does not follow this audio
reaches that r by chance (chance_p_value). On a 3 s clip at 8 fps r alone says little: the
mouth opening and the envelope are smooth (a syllable spans several frames), so 24 frames hold
some 11-24 independent ones, and the best of 5 offsets is kept; half of all unrelated voices
reach r 0.3 against a drawn close-up's lips. tags.py needs both r and p for audio-strong.

With the slow models on a stride (``annotators.pose.every_n_frames``,
``annotators.face.every_n_frames`` > 1) the mouth opening and the face boxes between measured
frames are interpolated, and both the proxy and SyncNet use them: SyncNet's reference pipeline
itself bridges missing detections by linear interpolation and median-filters the box track
over 13 frames, so boxes interpolated over a few frames cut nearly the same crops. SyncNet
needs one box list per frame (``faces`` as FaceDetector writes it at any stride); the strides
show in ``quality.methods.pose`` / ``face``.
"""

from __future__ import annotations

import math

import numpy as np

from data_pipelines import measures
from data_pipelines.annotators.base import AnnotatorUnavailable, ClipView, Findings, warn_once

MIN_MOUTH_CHANGE = 0.01  # std of the opening ratio below which the mouth "does not move"
# The effective number of frames sums autocorrelations up to lag N / 5 (Pyper & Peterman 1998):
# longer lags of a sample autocorrelation over ~24 frames are mostly noise.
AUTOCORRELATION_LAGS = 0.2


class LipSync:
    """Scores ``lip_sync`` (proxy r), ``lip_sync_p`` (its chance p), ``lip_sync_offset``
    (seconds, + = audio after the lips), ``lip_sync_confidence``; needs audio and mouth
    evidence, else records nothing."""

    name = "lip_sync"

    def __init__(
        self,
        max_offset_seconds: float = 0.2,
        min_frames: int = 8,
        syncnet_weights: str = "",
        syncnet_max_offset_frames: int = 15,
        syncnet_crop_scale: float = 0.4,
    ) -> None:
        self.max_offset_seconds, self.min_frames = max_offset_seconds, min_frames
        self.syncnet_max_offset_frames = syncnet_max_offset_frames
        self.syncnet_crop_scale = syncnet_crop_scale
        self._syncnet = None
        self.resolved = "proxy"
        if syncnet_weights:
            from data_pipelines.annotators.syncnet import load_syncnet

            self._syncnet = load_syncnet(syncnet_weights)
            self.resolved = f"syncnet:{syncnet_weights}"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        if clip.audio is None:
            return
        if self._syncnet is not None and self._score_syncnet(clip, found):
            return
        mouth = found.signals.get("mouth_opening")
        if mouth is not None:
            envelope = measures.frame_rms(clip.audio, clip.sample_rate, clip.fps, len(mouth))
            max_offset = max(0, round(self.max_offset_seconds * clip.fps))
            result = best_offset_correlation(mouth, envelope, max_offset, self.min_frames)
            if result is not None:
                r, offset, confidence = result
                found.scores["lip_sync"] = r
                found.scores["lip_sync_p"] = chance_p_value(
                    *aligned(mouth, envelope, offset), r, num_offsets=2 * max_offset + 1
                )
                found.scores["lip_sync_offset"] = offset / clip.fps
                found.scores["lip_sync_confidence"] = confidence
                found.methods["lip_sync"] = "proxy_mouth_opening"
            return
        keypoints = found.signals.get("keypoints")
        if keypoints is not None:
            darkness = measures.mouth_darkness(clip.frames, keypoints, clip.grey)
            energy = measures.frame_rms(clip.audio, clip.sample_rate, clip.fps, len(clip.frames))
            r = measures.darkness_energy_r(darkness, energy)
            if r is not None:
                found.scores["lip_sync"] = r
                found.scores["lip_sync_p"] = chance_p_value(darkness, energy, r, num_offsets=1)
                found.methods["lip_sync"] = "proxy_mouth_darkness"

    def _score_syncnet(self, clip: ClipView, found: Findings) -> bool:
        from data_pipelines.annotators import syncnet

        if abs(clip.fps - syncnet.SYNCNET_FPS) > 1e-6:
            raise AnnotatorUnavailable(
                f"SyncNet scores 25 fps clips, this job stores fps={clip.fps}: pass fps=25, "
                "or leave annotators.lip_sync.syncnet_weights empty for the proxy"
            )
        boxes = found.fields.get("faces")
        if boxes is None or len(boxes) != len(clip.frames):
            warn_once("SyncNet needs face boxes for every frame (annotators.face with a model "
                      "backend, before lip_sync): using the lip-sync proxy")  # fmt: skip
            return False
        crops = syncnet.face_crops(clip.frames, boxes, self.syncnet_crop_scale)
        if crops is None:
            return False
        audio = syncnet.prepare_audio(clip.audio, clip.sample_rate)
        result = syncnet.sync_scores(self._syncnet, crops, audio, self.syncnet_max_offset_frames)
        if result is None:
            return False
        confidence, distance, offset = result
        found.scores["sync_c"] = confidence
        found.scores["sync_distance"] = distance
        found.scores["sync_offset"] = offset / clip.fps
        found.methods["lip_sync"] = "syncnet"
        return True


def aligned(mouth: np.ndarray, envelope: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The overlapping frames of mouth[t] and envelope[t + offset]."""
    lo, hi = max(0, -offset), min(len(mouth), len(envelope) - offset)
    return mouth[lo:hi], envelope[lo + offset : hi + offset]


def best_offset_correlation(
    mouth: np.ndarray, envelope: np.ndarray, max_offset: int, min_frames: int
) -> tuple[float, int, float] | None:
    """(best r, its offset in frames, best r - median r) over offsets -max..+max, where
    offset k pairs mouth[t] with envelope[t + k]; frames without a mouth (NaN) are skipped.
    None when fewer than ``min_frames`` pairs or either signal is flat."""
    values = []
    for k in range(-max_offset, max_offset + 1):
        m, e = aligned(mouth, envelope, k)
        if len(m) < min_frames:
            continue
        valid = np.isfinite(m)
        if valid.sum() < min_frames:
            continue
        m, e = m[valid], e[valid]
        if np.std(m) < MIN_MOUTH_CHANGE or np.std(e) < 1e-6:
            continue
        values.append((float(np.corrcoef(m, e)[0, 1]), k))
    if not values:
        return None
    best, offset = max(values, key=lambda pair: (pair[0], -abs(pair[1])))
    return best, offset, best - float(np.median([r for r, _ in values]))


def chance_p_value(mouth: np.ndarray, envelope: np.ndarray, r: float, num_offsets: int) -> float:
    """One-sided p of Pearson ``r`` between two signals over the same frames (NaN in ``mouth``:
    no mouth seen, left out) if the mouth did not follow the audio, when ``r`` is the best of
    ``num_offsets`` offsets tried.

    Smooth signals have fewer independent frames than frames, so chance r runs high on short
    clips. The effective number of frames N* is Bartlett's, as Pyper & Peterman (1998, eq. 1)
    estimate it: 1/N* = 1/N + (2/N) sum_{j=1}^{N/5} rho_mouth(j) rho_envelope(j), at most N.
    p is Fisher's z = atanh(r) sqrt(N* - 3) under the normal tail, then Sidak-corrected for the
    best of the offsets: 1 - (1 - p)^num_offsets.

    Measured on 300 unrelated synthetic voices against five MediaPipe mouth tracks (20-29
    frames at 8 fps): r >= 0.3 for 22-64 % of them, and p <= 0.01 as well for 0-4 %, where
    counting every frame as independent (N* = N) passes up to 22 %; on smooth noise of 24
    frames p <= 0.01 for 0.8 % of pairs (N* = N: 5.3 %). Chosen over a shift null (the envelope
    circularly shifted far outside the offset window, best r over the same offsets): a
    24-frame clip has only ~20 such shifts, so its own p cannot go below ~0.05; a normal tail
    fitted to their spread passed up to 18 % of the unrelated voices at 0.01; their z-scores
    did not part own voices (z 2.6 for the small drawn figures) from unrelated speech (up to
    2.9 against carphone.mp4's lips). Deterministic, ~0.1 ms per clip."""
    measured = np.isfinite(mouth)
    frames = int(measured.sum())
    if frames <= 3:
        return 1.0
    lags = max(1, int(frames * AUTOCORRELATION_LAGS))
    shared = float(np.dot(autocorrelation(mouth, lags), autocorrelation(envelope, lags)))
    effective = frames / max(1.0, 1.0 + 2.0 * shared)
    if effective <= 3.0:
        return 1.0
    z = math.atanh(min(max(r, -0.999999), 0.999999)) * math.sqrt(effective - 3.0)
    p = 0.5 * math.erfc(z / math.sqrt(2.0))
    return float(-math.expm1(num_offsets * math.log1p(-min(p, 1.0 - 1e-16))))


def autocorrelation(signal: np.ndarray, max_lag: int) -> np.ndarray:
    """rho(1..max_lag): at each lag the mean product of the centred values over the pairs where
    both are finite, over the variance (Pyper & Peterman's N / (N - j) scaled estimate); 0 at
    a lag with no such pair or for a flat signal."""
    measured = np.isfinite(signal)
    centred = np.where(measured, signal - np.mean(signal[measured]), 0.0)
    variance = float(np.mean(centred[measured] ** 2))
    out = np.zeros(max_lag)
    if variance <= 0.0:
        return out
    for lag in range(1, max_lag + 1):
        pairs = measured[:-lag] & measured[lag:]
        if pairs.any():
            out[lag - 1] = np.mean((centred[:-lag] * centred[lag:])[pairs]) / variance
    return out
