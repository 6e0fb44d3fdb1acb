"""Encode frames + audio to mp4 bytes, and resample audio, with PyAV.

Encoding is deterministic, so the same frames always give the same bytes and the sample
corpus and the shards are reproducible: single-threaded x264, bit-exact muxing, and no
B-frames / macroblock-tree rate control (with them, x264's output was seen to vary from one
process to the next on identical input at small odd-macroblock sizes).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

AUDIO_BIT_RATE = 48_000
UNSPECIFIED_COLORSPACE = 2  # AVCOL_SPC_UNSPECIFIED: readers assume BT.601 (what RGB input gets)


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 20,
    yuv420p: np.ndarray | None = None,
    colorspace: int = UNSPECIFIED_COLORSPACE,
) -> bytes:
    """(T, H, W, 3) uint8 RGB with even H, W -> H.264 yuv420p mp4 bytes (+ AAC mono track).
    ``yuv420p``: the same frames as yuv420p planes (T, H * 3 / 2, W) uint8, encoded as they
    are instead of converting ``frames`` (no RGB round trip, less work), in the colour matrix
    ``colorspace`` (FFmpeg's AVColorSpace, e.g. 1 = BT.709), which the stream is tagged with
    so that readers turn them back into the same RGB."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sides, got {width}x{height}")
    expected = (len(frames), height * 3 // 2, width)
    if yuv420p is not None and (yuv420p.shape != expected or yuv420p.dtype != np.uint8):
        raise ValueError(f"yuv420p must be {expected} uint8 planes of the frames, "
                         f"got {yuv420p.shape} {yuv420p.dtype}")  # fmt: skip
    pictures = (
        (av.VideoFrame.from_ndarray(frame, format="rgb24") for frame in frames)
        if yuv420p is None
        else (av.VideoFrame.from_ndarray(planes, format="yuv420p") for planes in yuv420p)
    )
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream(
            "libx264",
            rate=Fraction(fps).limit_denominator(1001),
            options={"crf": str(crf), "preset": "fast", "threads": "1", "bf": "0", "mbtree": "0"},
        )
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.thread_count = 1
        if yuv420p is not None and colorspace != UNSPECIFIED_COLORSPACE:
            video.codec_context.colorspace = colorspace
        track = None
        if audio is not None:
            track = container.add_stream("aac", rate=sample_rate)
            track.layout = "mono"
            track.bit_rate = AUDIO_BIT_RATE
        for picture in pictures:
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if track is not None and len(audio):
            chunk = av.AudioFrame.from_ndarray(
                np.clip(audio, -1.0, 1.0).astype(np.float32)[None], format="flt", layout="mono"
            )
            chunk.sample_rate = sample_rate
            chunk.pts = 0  # lets the muxer record the encoder delay, keeping audio aligned
            container.mux(track.encode(chunk))
            container.mux(track.encode())
    return buffer.getvalue()


def resample_audio(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``rate`` -> ``target_rate`` with FFmpeg's resampler."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == target_rate or len(samples) == 0:
        return samples
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
    frame.sample_rate = rate
    pieces = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
