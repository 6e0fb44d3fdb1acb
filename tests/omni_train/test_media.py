"""Reading references and audio, writing mp4s whose audio stays in sync."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from omni_train.media import read_audio, read_first_frame, to_uint8_frames, write_mp4

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_mp4_round_trip_keeps_frames_and_audio_aligned(tmp_path):
    rate, fps = 16_000, 8.0
    frames = np.zeros((16, 32, 48, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(16, dtype=np.uint8)[:, None, None] * 15
    audio = np.zeros(2 * rate, np.float32)
    audio[rate : rate + 160] = 0.9  # a 10 ms click at exactly 1 s
    out = tmp_path / "clip.mp4"
    write_mp4(out, frames, fps, audio, rate)

    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 8
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 16
    assert abs(int(decoded[10][..., 0].mean()) - 150) <= 4
    back = read_audio(out, rate)
    assert abs(len(back) - len(audio)) < 0.1 * rate
    click = int(np.argmax(np.abs(back)))
    assert abs(click - rate) < 0.01 * rate, f"click at {click / rate:.3f} s, written at 1.000 s"


def test_first_frame_of_a_video_and_missing_file(tmp_path):
    frames = np.full((3, 16, 16, 3), 200, np.uint8)
    write_mp4(tmp_path / "v.mp4", frames, 8.0)
    first = read_first_frame(tmp_path / "v.mp4")
    assert first.shape == (16, 16, 3) and abs(int(first.mean()) - 200) <= 3
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_first_frame(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="no audio track"):
        read_audio(tmp_path / "v.mp4")


def test_uint8_conversion_clamps():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 5, 1, 1).expand(3, 5, 1, 1)
    out = to_uint8_frames(video)
    assert out.shape == (5, 1, 1, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared media not present")
def test_real_media_reads():
    image = read_first_frame(SHARED / "astronaut.png")
    assert image.ndim == 3 and image.shape[2] == 3
    speech = read_audio(SHARED / "speech_sample.wav")
    assert len(speech) > 16_000 and np.abs(speech).max() > 0.05
