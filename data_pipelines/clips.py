"""Decode a source at the target frame rate, find hard cuts, and cut it into clips.

A clip never straddles a cut: each shot is cut into ``clip_seconds`` pieces and a shot's
tail shorter than ``min_clip_seconds`` is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from data_pipelines.probe import RejectedInput

HIST_BINS = 16
CUT_NEIGHBOURHOOD = 4  # frames on each side that a cut's score must stand out from


@dataclass(frozen=True)
class DecodedSource:
    frames: np.ndarray  # (N, H, W, 3) uint8, frame k shows the source at time k / fps
    fps: float
    audio: np.ndarray | None  # (S,) float32 mono at sample_rate, sample 0 = frame 0's time
    sample_rate: int


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_side, both even."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decode_source(path: Path, fps: float, max_side: int, sample_rate: int) -> DecodedSource:
    """Frames at ``fps`` (the source frame nearest each time step) and the mono audio track."""
    try:
        frames, video_start = _decode_frames(path, fps, max_side)
    except av.error.FFmpegError as err:
        why = getattr(err, "strerror", None) or str(err)
        raise RejectedInput("decode_error", f"the video stream stops decoding ({why})") from err
    if not frames:
        raise RejectedInput("no_frames", "the video stream decodes to no frames")
    try:
        audio = _decode_audio(path, sample_rate, video_start)
    except av.error.FFmpegError:
        audio = None  # a damaged audio track leaves a usable silent video
    return DecodedSource(np.stack(frames), fps, audio, sample_rate)


def _decode_frames(path: Path, fps: float, max_side: int) -> tuple[list[np.ndarray], float]:
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        size = output_size(stream.codec_context.width, stream.codec_context.height, max_side)
        period = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps

        def convert(frame: av.VideoFrame) -> np.ndarray:
            return frame.reformat(
                width=size[0], height=size[1], format="rgb24", interpolation="AREA"
            ).to_ndarray()

        start, previous, previous_time, index = None, None, 0.0, 0
        for frame in container.decode(stream):
            time = frame.time if frame.time is not None else index * period
            index += 1
            start = time if start is None else start
            time -= start
            # Emit every target time this frame (or the one before it) is nearest to.
            while len(out) / fps <= time:
                target = len(out) / fps
                use_previous = previous is not None and target - previous_time < time - target
                out.append(convert(previous if use_previous else frame))
            previous, previous_time = frame, time
        # The last frame is shown for one source frame period.
        while previous is not None and len(out) / fps < previous_time + period / 2:
            out.append(convert(previous))
    return out, start or 0.0


def _decode_audio(path: Path, sample_rate: int, video_start: float) -> np.ndarray | None:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        pieces, first_time = [], None
        for frame in container.decode(container.streams.audio[0]):
            if first_time is None and frame.time is not None:
                first_time = frame.time
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    if not pieces:
        return None
    audio = np.concatenate(pieces).astype(np.float32)
    # Align sample 0 with the first video frame.
    shift = round(((first_time or 0.0) - video_start) * sample_rate)
    if shift > 0:
        return np.concatenate([np.zeros(shift, np.float32), audio])
    return audio[-shift:]


def frame_change_scores(frames: np.ndarray) -> np.ndarray:
    """(N-1,) scores in [0, 1]: how much frame k+1 differs from frame k.

    Mean of a colour-histogram distance (insensitive to motion) and the mean absolute
    difference of 8x8-block averages (insensitive to small shifts), each in [0, 1].
    """
    if len(frames) < 2:
        return np.zeros(0, np.float32)
    pixels = frames.shape[1] * frames.shape[2]
    hists = np.stack([
        np.concatenate([np.bincount(f[..., c].ravel() // (256 // HIST_BINS), minlength=HIST_BINS)
                        for c in range(3)]) / pixels
        for f in frames
    ])  # fmt: skip
    hist_distance = 0.5 * np.abs(np.diff(hists, axis=0)).sum(axis=1) / 3
    blocks = _block_means(frames.astype(np.float32), 8)
    block_difference = np.abs(np.diff(blocks, axis=0)).mean(axis=(1, 2, 3)) / 255.0
    return (0.5 * hist_distance + 0.5 * np.minimum(1.0, 4.0 * block_difference)).astype(np.float32)


def _block_means(frames: np.ndarray, block: int) -> np.ndarray:
    n, h, w, c = frames.shape
    hb, wb = max(1, h // block), max(1, w // block)
    cropped = frames[:, : hb * block, : wb * block] if h >= block and w >= block else frames
    if h < block or w < block:
        return cropped.mean(axis=(1, 2), keepdims=True)
    return cropped.reshape(n, hb, block, wb, block, c).mean(axis=(2, 4))


def detect_cuts(frames: np.ndarray, threshold: float) -> list[int]:
    """Frame indices that start a new shot.

    A cut is a change score above ``threshold`` that is also at least three times the median
    score of its neighbourhood, so fast motion (uniformly high scores) is not cut.
    """
    scores = frame_change_scores(frames)
    cuts = []
    for k, score in enumerate(scores):
        lo, hi = max(0, k - CUT_NEIGHBOURHOOD), min(len(scores), k + CUT_NEIGHBOURHOOD + 1)
        neighbours = np.delete(scores[lo:hi], k - lo)
        typical = float(np.median(neighbours)) if len(neighbours) else 0.0
        if score > threshold and score > 3.0 * typical:
            cuts.append(k + 1)
    return cuts


def clip_spans(
    num_frames: int, cuts: list[int], clip_frames: int, min_frames: int
) -> list[tuple[int, int]]:
    """[start, end) frame spans: each shot cut into clip_frames pieces, short tails dropped."""
    spans = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < num_frames), num_frames]
    for shot_start, shot_end in zip(bounds[:-1], bounds[1:], strict=True):
        for start in range(shot_start, shot_end, clip_frames):
            end = min(start + clip_frames, shot_end)
            if end - start >= min_frames:
                spans.append((start, end))
    return spans
