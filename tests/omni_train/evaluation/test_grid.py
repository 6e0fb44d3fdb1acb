"""The side-by-side mp4: column order, padding of a shorter real clip, the audio track."""

from __future__ import annotations

import numpy as np

from data_pipelines.testing import decode_mp4
from omni_train.evaluation.grid import GAP, grid_frames, grid_name, write_grid


def flat(value, frames, size=16):
    return np.full((frames, size, size, 3), value, np.uint8)


def test_columns_are_real_static_generated_and_a_short_real_clip_turns_black():
    grid = grid_frames([flat(10, 3), flat(20, 5), flat(30, 5)])
    assert grid.shape == (5, 16, 3 * 16 + 2 * GAP, 3)
    assert (grid[:3, :, :16] == 10).all() and (grid[3:, :, :16] == 0).all()
    assert (grid[:, :, 16 : 16 + GAP] == 255).all()
    assert (grid[:, :, 16 + GAP : 32 + GAP] == 20).all()
    assert (grid[:, :, 32 + 2 * GAP :] == 30).all()


def test_grid_mp4_has_every_frame_and_the_audio_padded_to_its_length(tmp_path):
    audio = np.sin(np.arange(8000) / 10).astype(np.float32) * 0.5  # 0.5 s of a 3 s grid
    path = write_grid(
        tmp_path / grid_name(0, "a/b c"), flat(60, 16), flat(120, 24), flat(200, 24), 8.0, audio
    )
    assert path.name == "000_a_b_c.mp4"
    frames, track, rate = decode_mp4(path.read_bytes())
    assert frames.shape == (24, 16, 52, 3)
    assert abs(int(frames[0, 8, 44, 0]) - 200) <= 3  # generated column, through H.264
    assert rate == 16_000 and abs(len(track) - 48_000) <= 2048
