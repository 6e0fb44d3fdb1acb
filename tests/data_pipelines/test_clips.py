from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.clips import ShotCutter, clip_spans, detect_cuts
from data_pipelines.decoding import AudioTrack, DamageLog, output_size, video_frames
from data_pipelines.media import encode_mp4


def _scene(background: tuple[int, int, int], square_x: list[int], size=(48, 64)) -> np.ndarray:
    """Frames of a textured background with a dark square moving to the given x positions."""
    h, w = size
    texture = (np.add.outer(np.arange(h), np.arange(w)) % 16 * 4).astype(np.int16)
    base = np.clip(np.asarray(background, np.int16) + texture[..., None], 0, 255)
    frames = np.repeat(base[None].astype(np.uint8), len(square_x), axis=0)
    for frame, x in zip(frames, square_x, strict=True):
        frame[16:32, x : x + 12] = (20, 20, 20)
    return frames


def test_a_hard_cut_is_found_and_motion_is_not():
    shot_a = _scene((180, 150, 120), list(range(4, 28, 2)))  # 12 frames, square moving
    shot_b = _scene((60, 110, 190), list(range(40, 16, -2)))  # 12 frames, elsewhere
    assert detect_cuts(np.concatenate([shot_a, shot_b]), threshold=0.3) == [12]
    assert detect_cuts(shot_a, threshold=0.3) == []
    fast = _scene((180, 150, 120), [4, 40, 8, 44, 12, 48, 16, 40, 8, 36, 4, 40])
    assert detect_cuts(fast, threshold=0.3) == []


def test_a_gradual_fade_is_not_a_cut():
    fade = np.stack([np.full((32, 32, 3), level, np.uint8) for level in range(40, 220, 10)])
    assert detect_cuts(fade, threshold=0.3) == []


@pytest.mark.parametrize(
    ("num_frames", "cuts", "expected"),
    [
        (26, [], [(0, 24)]),  # tail of 2 frames dropped
        (42, [], [(0, 24), (24, 42)]),  # tail of 18 frames kept
        (40, [20], [(0, 20), (20, 40)]),  # never across the cut
        (40, [10], [(10, 34)]),  # a 10-frame shot is too short
        (30, [0, 30, 31], [(0, 24)]),  # cuts at the edges are ignored
        (17, [], []),
    ],
)
def test_clip_spans(num_frames, cuts, expected):
    assert clip_spans(num_frames, cuts, clip_frames=24, min_frames=18) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((176, 144), (160, 130)),
        ((100, 50), (100, 50)),
        ((101, 75), (100, 74)),
        ((1920, 1080), (160, 90)),
        ((90, 1600), (8, 160)),
    ],
)
def test_output_size_is_even_and_capped(size, expected):
    assert output_size(*size, max_side=160) == expected


def test_decode_resamples_frames_and_aligns_audio(tmp_path):
    # 25 fps source whose frame k has grey level 2k; a 0.1 s click at 1.0 s in the audio.
    frames = np.repeat(np.arange(0, 200, 2, dtype=np.uint8)[:, None, None, None], 3, axis=3)
    frames = np.ascontiguousarray(np.broadcast_to(frames, (100, 32, 48, 3)))
    audio = np.zeros(4 * 16000, np.float32)
    audio[16000:17600] = 0.5
    path = tmp_path / "ramp.mp4"
    path.write_bytes(encode_mp4(frames, 25, audio, 16000, crf=0))
    damage = DamageLog()
    track = AudioTrack.decode(path, 16000, None, damage, 2.0)
    aligned = []

    def align(origin: float) -> None:
        track.align(origin, damage)
        aligned.append(origin)

    decoded = np.stack([f.image for f in video_frames(path, 8.0, 160, damage, 2.0, align)])
    assert len(aligned) == 1  # once, at the first frame
    assert len(decoded) == 32  # 0, 0.125, ..., 3.875 s
    levels = decoded[:, 16, 24, 0].astype(int)
    expected = 2 * np.round(np.arange(32) * 25 / 8)
    assert np.abs(levels - expected).max() <= 3
    try:
        audio = track.slice(0.0, 4.0)
    finally:
        track.close()
    assert not track.file.exists() and damage.events == []
    loud = np.flatnonzero(np.abs(audio) > 0.25) / 16000
    assert abs(loud[0] - 1.0) < 0.01 and abs(loud[-1] - 1.1) < 0.01


def _shots(rng: np.random.Generator, n: int, size: tuple[int, int] = (16, 24)) -> np.ndarray:
    """Random shots: flat, noisy or with a moving bar, of random lengths."""
    frames: list[np.ndarray] = []
    while len(frames) < n:
        length, base, kind = int(rng.integers(1, 40)), rng.integers(0, 255, 3), rng.integers(3)
        for i in range(length):
            frame = np.zeros((*size, 3), np.uint8) + base.astype(np.uint8)
            if kind == 1:
                frame = (frame + rng.integers(0, 60, frame.shape)).astype(np.uint8)
            if kind == 2:
                frame[:, : (i * 3) % size[1]] = 255
            frames.append(frame)
    return np.stack(frames[:n])


@pytest.mark.parametrize("size", [(16, 24), (48, 64)])  # read whole / at every other pixel
def test_streaming_cutter_cuts_exactly_as_the_whole_list_is_cut(size):
    rng = np.random.default_rng(0)
    for _ in range(100):
        frames = _shots(rng, int(rng.integers(1, 90)), size)
        clip_frames = int(rng.integers(2, 30))
        min_frames = int(rng.integers(1, clip_frames + 1))
        want = clip_spans(len(frames), detect_cuts(frames, 0.3), clip_frames, min_frames)
        cutter, clips = ShotCutter(0.3, clip_frames, min_frames), []
        for frame in frames:
            clips += cutter.push(frame)
            # Bounded: the clip being filled plus the look-ahead of a cut decision.
            assert len(cutter.frames) <= clip_frames + 6
        clips += cutter.finish()
        assert [(c.start, c.start + len(c.frames)) for c in clips] == want
        for clip in clips:
            np.testing.assert_array_equal(
                clip.frames, frames[clip.start : clip.start + len(clip.frames)]
            )


def test_a_known_new_shot_starts_a_new_clip():
    frames = np.zeros((20, 16, 16, 3), np.uint8) + 100
    cutter, clips = ShotCutter(0.3, clip_frames=8, min_frames=4), []
    for index, frame in enumerate(frames):
        clips += cutter.push(frame, new_shot=index == 6)
    clips += cutter.finish()
    assert [(c.start, len(c.frames)) for c in clips] == [(0, 6), (6, 8), (14, 6)]
