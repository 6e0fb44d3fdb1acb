"""Find hard cuts in a stream of frames and cut it into clips (decoding: decoding.py).

A clip never straddles a cut: each shot is cut into ``clip_seconds`` pieces and a shot's
tail shorter than ``min_clip_seconds`` is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIST_BINS = 16
CUT_NEIGHBOURHOOD = 4  # frames on each side that a cut's score must stand out from


def frame_change_scores(frames: np.ndarray) -> np.ndarray:
    """(N-1,) scores in [0, 1]: how much frame k+1 differs from frame k.

    Mean of a colour-histogram distance (insensitive to motion) and the mean absolute
    difference of 8x8-block averages (insensitive to small shifts), each in [0, 1]. Frames of
    32 pixels or more a side are read at every other pixel and row (the figures barely move;
    the cost falls 4x).
    """
    features = [_frame_features(frame) for frame in frames]
    return np.array(
        [_change_score(a, b) for a, b in zip(features, features[1:], strict=False)], np.float32
    )


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


@dataclass(frozen=True)
class Clip:
    start: int  # frame index of its first frame
    frames: np.ndarray  # (T, H, W, 3) uint8
    # The frames as yuv420p planes (T, H * 3 / 2, W) when they were pushed with them.
    planes: np.ndarray | None = None


class ShotCutter:
    """The clips of a stream of frames, cut as ``detect_cuts`` + ``clip_spans`` cut the whole
    list, holding only the current clip and the few frames of look-ahead a cut decision
    needs (CUT_NEIGHBOURHOOD + 1)."""

    def __init__(self, threshold: float, clip_frames: int, min_frames: int) -> None:
        self.threshold, self.clip_frames, self.min_frames = threshold, clip_frames, min_frames
        self.frames: list[np.ndarray] = []  # frames from index self.first on
        self.planes: list[np.ndarray] = []  # their yuv420p planes, when pushed with them
        self.first = 0
        self.count = 0  # frames pushed
        self.scores: dict[int, float] = {}  # score k compares frames k and k+1
        self.cuts: list[int] = []  # decided cut positions not yet passed
        self.decided = 0  # every cut position <= decided is known
        self.piece = 0  # first frame of the clip being filled
        self._features: tuple[np.ndarray, np.ndarray] | None = None

    def push(
        self, frame: np.ndarray, new_shot: bool = False, planes: np.ndarray | None = None
    ) -> list[Clip]:
        """Add the next frame (``new_shot``: a cut is known to precede it; ``planes``: the
        same frame as yuv420p planes, handed on in the clip; all frames or none)."""
        features = _frame_features(frame)
        if self._features is not None:
            self.scores[self.count - 1] = _change_score(self._features, features)
        self._features = features
        if new_shot and self.count > 0:
            self.cuts.append(self.count)
        self.frames.append(frame)
        if planes is not None:
            self.planes.append(planes)
        if len(self.planes) not in (0, len(self.frames)):
            raise ValueError("push planes with every frame or with none")
        self.count += 1
        self._decide(final=False)
        return self._emit(final=False)

    def finish(self) -> list[Clip]:
        self._decide(final=True)
        return self._emit(final=True)

    def _decide(self, final: bool) -> None:
        n = self.count - 1  # number of scores
        while self.decided < n and (final or self.decided + CUT_NEIGHBOURHOOD < n):
            k = self.decided  # decides cut position k + 1
            lo, hi = max(0, k - CUT_NEIGHBOURHOOD), min(n, k + CUT_NEIGHBOURHOOD + 1)
            neighbours = sorted(self.scores[j] for j in range(lo, hi) if j != k)
            typical = _median_of_sorted(neighbours)
            score = self.scores[k]
            if score > self.threshold and score > 3.0 * typical and k + 1 not in self.cuts:
                self.cuts.append(k + 1)
            self.decided += 1
            self.scores.pop(k - CUT_NEIGHBOURHOOD, None)  # no longer anyone's neighbour
        if final:
            self.decided = self.count

    def _emit(self, final: bool) -> list[Clip]:
        out = []
        while True:
            ahead = sorted(c for c in self.cuts if c > self.piece)
            end = min([self.piece + self.clip_frames, *ahead[:1], self.count])
            if end <= self.piece:
                break
            complete = end == self.piece + self.clip_frames or (ahead and end == ahead[0])
            if not final and not (complete and self.decided >= end - 1 and end <= self.count):
                break
            if not complete and not final:
                break
            if end - self.piece >= self.min_frames:
                start = self.piece - self.first
                span = slice(start, end - self.first)
                planes = np.stack(self.planes[span]) if self.planes else None
                out.append(Clip(self.piece, np.stack(self.frames[span]), planes))
            self.piece = end
            self.cuts = [c for c in self.cuts if c > self.piece]
            drop = self.piece - self.first
            del self.frames[:drop]
            del self.planes[:drop]
            self.first = self.piece
        return out


def _median_of_sorted(values: list[float]) -> float:
    """np.median of a short sorted list, without numpy's per-call cost (same float64 value)."""
    n = len(values)
    if n == 0:
        return 0.0
    middle = n // 2
    return values[middle] if n % 2 else (values[middle - 1] + values[middle]) / 2


def _frame_features(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colour histogram and the 8x8-block means of a frame, read at every other pixel
    and row once both sides are at least 32 (each 8x8 block then from its 4x4 samples)."""
    h, w = frame.shape[:2]
    step = 2 if min(h, w) >= 32 else 1
    sample = frame[::step, ::step]
    # 16 bins per channel: each channel's 256 levels counted, then summed 16 at a time.
    counts = [
        np.bincount(sample[..., channel].reshape(-1), minlength=256)
        .reshape(HIST_BINS, 256 // HIST_BINS)
        .sum(axis=1)
        for channel in range(3)
    ]
    hist = np.concatenate(counts) / (sample.shape[0] * sample.shape[1])
    if h < 8 or w < 8:
        return hist, _block_means(frame[None].astype(np.float32), 8)[0]
    hb, wb = h // 8, w // 8
    # Rows first, as whole contiguous lines (the fast reduction), then the columns.
    rows = frame[: hb * 8].reshape(hb, 8 // step, step, w, 3)[:, :, 0, : wb * 8]
    row_sums = rows.sum(axis=1, dtype=np.uint16)  # at most 8 x 255
    columns = row_sums.reshape(hb, wb, 8, 3)
    sums = columns[:, :, 0].copy()  # at most 64 x 255: uint16 holds it
    for column in range(step, 8, step):  # strided adds beat a reduction over a short axis
        sums += columns[:, :, column]
    return hist, sums.astype(np.float32) / np.float32((8 // step) ** 2)


def _change_score(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """frame_change_scores for one pair of frames, from their features."""
    hist_distance = 0.5 * np.abs(b[0] - a[0]).sum() / 3
    block_difference = np.abs(b[1] - a[1]).mean() / 255.0
    return float(np.float32(0.5 * hist_distance + 0.5 * min(1.0, 4.0 * block_difference)))
