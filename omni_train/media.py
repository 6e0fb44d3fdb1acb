"""Reading reference images and audio, writing an mp4 with its audio track (PyAV)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

AUDIO_RATE = 16_000


def read_first_frame(path: str | Path) -> np.ndarray:
    """The first frame of an image (png/jpg/...) or a video, as HxWx3 uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image {path} does not exist")
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"cannot read an image from {path}: {err}") from err
    raise ValueError(f"{path} contains no image or video frame")


def reference_tensor(path: str | Path, resolution: list[int]) -> torch.Tensor:
    """The first frame of ``path`` resized and center-cropped to (1, 3, H, W) in [-1, 1]."""
    from omni_train.data.decode import crop_geometry, resize_crop  # torch-side resize

    image = read_first_frame(path)
    geometry = crop_geometry(image.shape[0], image.shape[1], *resolution)
    return resize_crop(image[None], geometry)


def read_audio(path: str | Path, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """The whole audio track of ``path`` as float32 mono at ``sample_rate``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path} has no audio track: pass a file with speech")
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode audio from {path}: {err}") from err
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = AUDIO_RATE,
) -> None:
    """Write (T, H, W, 3) uint8 frames as H.264 with an optional AAC mono track."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        video_stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video_stream.width, video_stream.height = width - width % 2, height - height % 2
        video_stream.pix_fmt = "yuv420p"
        audio_stream = None
        if audio is not None and len(audio):
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = "mono"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame[: video_stream.height, : video_stream.width]),
                format="rgb24",
            )
            container.mux(video_stream.encode(image))
        container.mux(video_stream.encode())
        if audio_stream is not None:
            samples = np.clip(audio, -1, 1).astype(np.float32)[None, :]
            audio_frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            audio_frame.sample_rate = sample_rate
            # Without an explicit start the encoder's priming delay shifts the audio late.
            audio_frame.pts = 0
            container.mux(audio_stream.encode(audio_frame))
            container.mux(audio_stream.encode())


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file as (T, H, W, 3) uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode video from {path}: {err}") from err
    if not frames:
        raise ValueError(f"{path} contains no video frame")
    return np.stack(frames)
