"""Measurements of one clip: audio activity and loudness, motion, sharpness, pose quality.

Every function is pure (arrays in, floats out). Images are uint8 RGB (T, H, W, 3); audio is
float32 mono in [-1, 1]; keypoints are (T, 17, 3) [x, y, visibility] normalised to [0, 1].
Image measures take an optional ``grey_frames`` (= ``grey(frames)``, e.g. ClipView.grey) so a
caller measuring one clip several ways converts it to grey once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_pipelines.config import VoiceActivityConfig

SILENCE_DBFS = -120.0
HEAD_JOINTS = (0, 1, 2)  # nose and both eyes (COCO-17)
VISIBLE = 0.5
MIN_MOUTH_CHANGE = 1.0  # grey levels (std over the clip) for the lip-sync proxy to apply


# ----------------------------------------------------------------------------- audio
def hop_energies_dbfs(audio: np.ndarray, sample_rate: int, vad: VoiceActivityConfig) -> np.ndarray:
    """Energy (dBFS) of each ``frame_seconds`` window, one per ``hop_seconds``."""
    frame = max(1, round(vad.frame_seconds * sample_rate))
    hop = max(1, round(vad.hop_seconds * sample_rate))
    if len(audio) < frame:
        return np.full(1, loudness_dbfs(audio))
    # One window per hop, as views of the squared signal: the same means, without a loop.
    squared = audio.astype(np.float64) ** 2
    power = np.lib.stride_tricks.sliding_window_view(squared, frame)[::hop].mean(axis=1)
    return np.maximum(10.0 * np.log10(np.maximum(power, 1e-12)), SILENCE_DBFS)


def noise_floor_dbfs(audio: np.ndarray, sample_rate: int, vad: VoiceActivityConfig) -> float:
    """The track's background level: the 10th percentile of its hop energies."""
    return float(np.percentile(hop_energies_dbfs(audio, sample_rate, vad), 10))


def voice_activity(
    audio: np.ndarray, sample_rate: int, vad: VoiceActivityConfig, floor_dbfs: float | None = None
) -> np.ndarray:
    """Boolean per hop: loud enough in absolute terms and well above the noise floor.

    Pass the floor of the whole source track when measuring a piece of it, so that a clip
    that is speech from start to end is not judged against its own (speech) level.
    """
    energies = hop_energies_dbfs(audio, sample_rate, vad)
    floor = float(np.percentile(energies, 10)) if floor_dbfs is None else floor_dbfs
    return (energies > vad.min_dbfs) & (energies > floor + vad.margin_over_floor_db)


def speech_fraction(
    audio: np.ndarray, sample_rate: int, vad: VoiceActivityConfig, floor_dbfs: float | None = None
) -> float:
    """Fraction of hops that the energy detector marks as voice."""
    if len(audio) == 0:
        return 0.0
    return float(voice_activity(audio, sample_rate, vad, floor_dbfs).mean())


def loudness_dbfs(audio: np.ndarray) -> float:
    """RMS level in dBFS (full-scale sine = -3 dBFS); digital silence is -120."""
    if len(audio) == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    return max(SILENCE_DBFS, 20.0 * np.log10(max(rms, 1e-12)))


def frame_rms(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """RMS of the audio under each video frame."""
    per_frame = sample_rate / fps
    out = np.zeros(num_frames, np.float64)
    for i in range(num_frames):
        span = audio[round(i * per_frame) : round((i + 1) * per_frame)]
        out[i] = np.sqrt(np.mean(span.astype(np.float64) ** 2)) if len(span) else 0.0
    return out


# ----------------------------------------------------------------------------- image
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CHUNK_VALUES = 1 << 18  # frames are processed ~1 MB of float32 at a time, so each pass
# over a chunk stays in cache (2-3x faster than whole-clip passes; the same result)


def _chunks(num_frames: int, frame_values: int) -> Iterator[slice]:
    step = max(1, _CHUNK_VALUES // max(1, frame_values))
    for start in range(0, num_frames, step):
        yield slice(start, min(num_frames, start + step))


def grey(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB -> (..., H, W) float32 luma, 0-255."""
    if frames.ndim < 4:
        return frames.astype(np.float32) @ _LUMA
    out = np.empty(frames.shape[:-1], np.float32)
    flat_in, flat_out = frames.reshape(-1, *frames.shape[-3:]), out.reshape(-1, *out.shape[-2:])
    for chunk in _chunks(len(flat_in), flat_in[0].size):
        np.matmul(flat_in[chunk].astype(np.float32), _LUMA, out=flat_out[chunk])
    return out


def _grey_of(frames: np.ndarray, grey_frames: np.ndarray | None) -> np.ndarray:
    """``grey_frames`` when the caller already has ``grey(frames)`` (it is then not
    recomputed; the result is the same to the bit), else ``grey(frames)``."""
    if grey_frames is None:
        return grey(frames)
    if grey_frames.shape != frames.shape[:-1] or grey_frames.dtype != np.float32:
        raise ValueError(
            f"grey_frames {grey_frames.dtype} {grey_frames.shape} is not grey(frames) of frames "
            f"{frames.shape}: pass measures.grey(frames) (float32 (T, H, W)) or None"
        )
    return grey_frames


def motion(frames: np.ndarray, grey_frames: np.ndarray | None = None) -> float:
    """Mean absolute difference between consecutive grey frames, 0-1 scale."""
    if len(frames) < 2:
        return 0.0
    g = _grey_of(frames, grey_frames)
    differences = np.empty((len(g) - 1, *g.shape[1:]), np.float32)
    for chunk in _chunks(len(differences), g[0].size):
        later = slice(chunk.start + 1, chunk.stop + 1)
        np.subtract(g[later], g[chunk], out=differences[chunk])
        np.abs(differences[chunk], out=differences[chunk])
    return float(differences.mean() / 255.0)


def sharpness(frames: np.ndarray, grey_frames: np.ndarray | None = None) -> float:
    """Mean over frames of the variance of the 4-neighbour Laplacian (0-255 grey)."""
    g = _grey_of(frames, grey_frames)
    variances = np.empty(len(g), np.float32)
    for chunk in _chunks(len(g), g[0].size):
        x = g[chunk]
        lap = x[:, :-2, 1:-1] + x[:, 2:, 1:-1]
        lap += x[:, 1:-1, :-2]
        lap += x[:, 1:-1, 2:]
        lap -= 4.0 * x[:, 1:-1, 1:-1]
        variances[chunk] = lap.reshape(len(x), -1).var(axis=1)
    return float(variances.mean())


def contrast(frames: np.ndarray, grey_frames: np.ndarray | None = None) -> float:
    """Mean over frames of the standard deviation of grey levels (0-255); ~0 means blank."""
    g = _grey_of(frames, grey_frames)
    deviations = np.empty(len(g), np.float32)
    for chunk in _chunks(len(g), g[0].size):
        deviations[chunk] = g[chunk].reshape(len(g[chunk]), -1).std(axis=1)
    return float(deviations.mean())


def brightness(frames: np.ndarray, grey_frames: np.ndarray | None = None) -> float:
    return float(_grey_of(frames, grey_frames).mean() / 255.0)


# ----------------------------------------------------------------------------- pose
def visible_mask(keypoints: np.ndarray) -> np.ndarray:
    return keypoints[..., 2] >= VISIBLE


def pose_visibility(keypoints: np.ndarray) -> float:
    """Mean fraction of the 17 joints visible per frame."""
    return float(visible_mask(keypoints).mean())


def head_visibility(keypoints: np.ndarray) -> float:
    """Fraction of frames where the nose and both eyes are visible."""
    return float(visible_mask(keypoints)[:, HEAD_JOINTS].all(axis=1).mean())


def keypoint_motion(keypoints: np.ndarray) -> float:
    """Mean displacement per frame of joints visible in both frames (normalised units)."""
    if len(keypoints) < 2:
        return 0.0
    both = visible_mask(keypoints[1:]) & visible_mask(keypoints[:-1])
    if not both.any():
        return 0.0
    step = np.linalg.norm(np.diff(keypoints[..., :2], axis=0), axis=-1)
    return float(step[both].mean())


def pose_jitter(keypoints: np.ndarray, centres: np.ndarray | None = None) -> float:
    """Median |acceleration| of joints visible in three consecutive frames; high = unstable.

    ``centres``: count only the accelerations at these frames (e.g. the frames a model ran
    on, when the ones between are interpolated and so have no acceleration of their own)."""
    if len(keypoints) < 3:
        return 0.0
    vis = visible_mask(keypoints)
    valid = vis[2:] & vis[1:-1] & vis[:-2]
    if centres is not None:
        valid &= np.isin(np.arange(1, len(keypoints) - 1), centres)[:, None]
    if not valid.any():
        return 0.0
    xy = keypoints[..., :2]
    accel = np.linalg.norm(xy[2:] - 2 * xy[1:-1] + xy[:-2], axis=-1)
    return float(np.median(accel[valid]))


# ----------------------------------------------------------------------------- lip sync
def lip_sync(
    frames: np.ndarray,
    keypoints: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    grey_frames: np.ndarray | None = None,
) -> float | None:
    """Pearson r between mouth-region darkness and audio energy per frame, or None.

    An open mouth is darker than closed lips, so on a talking face the region below the nose
    darkens when the voice is loud. A cheap, model-free stand-in for a SyncNet score: near 0
    for unrelated audio, clearly positive for lips that follow it.
    """
    darkness = mouth_darkness(frames, keypoints, grey_frames)
    return darkness_energy_r(darkness, frame_rms(audio, sample_rate, fps, len(frames)))


def mouth_darkness(
    frames: np.ndarray, keypoints: np.ndarray, grey_frames: np.ndarray | None = None
) -> np.ndarray:
    """(T,) darkness (255 - mean grey) of the region below the nose, NaN in frames without
    nose and eyes. The region moves with the nose and scales with the eye distance."""
    height, width = frames.shape[1:3]
    g = _grey_of(frames, grey_frames)
    darkness = np.full(len(frames), np.nan)
    for i, points in enumerate(keypoints):
        if not (points[list(HEAD_JOINTS), 2] >= VISIBLE).all():
            continue
        nose = points[0, :2] * (width, height)
        eye_distance = float(np.linalg.norm((points[1, :2] - points[2, :2]) * (width, height)))
        if eye_distance < 2.0:
            continue
        cx, cy = nose[0], nose[1] + 0.5 * eye_distance
        half_w, half_h = max(1.0, 0.45 * eye_distance), max(1.0, 0.3 * eye_distance)
        top, bottom = int(max(0, cy - half_h)), int(min(height, np.ceil(cy + half_h)))
        left, right = int(max(0, cx - half_w)), int(min(width, np.ceil(cx + half_w)))
        if bottom <= top or right <= left:
            continue
        darkness[i] = 255.0 - float(g[i, top:bottom, left:right].mean())
    return darkness


def darkness_energy_r(darkness: np.ndarray, energy: np.ndarray) -> float | None:
    """Pearson r over the frames with a darkness value, or None with fewer than 4 of them."""
    measured = np.isfinite(darkness)
    darkness, energy = darkness[measured], energy[measured]
    # A mouth region that barely changes gives no evidence either way.
    if len(darkness) < 4 or np.std(darkness) < MIN_MOUTH_CHANGE or np.std(energy) < 1e-6:
        return None
    return float(np.corrcoef(darkness, energy)[0, 1])
