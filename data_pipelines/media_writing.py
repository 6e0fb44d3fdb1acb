"""Write small test media deterministically and find their packets on disk.

Frames carry their source frame index as a strip of black/white cells (``read_frame_index``)
and a red marker in the top-left corner, so orientation is visible; audio is a sine whose
pitch steps every second of the source timeline (``tone_frequency``), so gaps, offsets and
misaligned samples are measurable. ``write_media`` muxes them bit-exactly (same bytes on every
call); ``packet_layout`` and ``overwrite_packets`` locate and damage packets in place.
damaged_media.py builds its cases on these.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

INDEX_BITS = 16
SAMPLE_RATE = 48_000
TONE_AMPLITUDE = 0.5
BASE_TONE_HZ = 440.0
TONE_STEP_HZ = 110.0
TONE_STEPS = 4
VIDEO_TIME_BASE = Fraction(1, 1000)
CASE_SIZE = (160, 96)
BITEXACT = {"fflags": "+bitexact"}
X264_OPTIONS = {
    "crf": "20",
    "preset": "veryfast",
    "threads": "1",
    "bf": "0",
    "mbtree": "0",
}


# ---------------------------------------------------------------- content


def tone_frequency(seconds: float) -> float:
    """Pitch of the test tone at ``seconds`` on the source timeline."""
    return BASE_TONE_HZ + TONE_STEP_HZ * (math.floor(seconds) % TONE_STEPS)


def tone(start_sample: int, count: int, rate: int) -> np.ndarray:
    """Tone samples ``start_sample .. start_sample + count`` of the source timeline."""
    t = (start_sample + np.arange(count)) / rate
    hz = BASE_TONE_HZ + TONE_STEP_HZ * (np.floor(t) % TONE_STEPS)
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _strip_height(height: int) -> int:
    return max(8, height // 6)


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: bit cells of ``index`` on top (LSB left), red marker top-left,
    a grey bar that moves one column per frame."""
    if index >= 1 << INDEX_BITS:
        raise ValueError(f"frame index {index} needs more than {INDEX_BITS} bits")
    frame = np.full((height, width, 3), 96, np.uint8)
    strip, cell = _strip_height(height), width // INDEX_BITS
    for bit in range(INDEX_BITS):
        frame[:strip, bit * cell : (bit + 1) * cell] = 255 if (index >> bit) & 1 else 0
    frame[:, (index % width)] = 200
    marker = max(4, min(width, height) // 5)
    frame[strip + 2 : strip + 2 + marker, 2 : 2 + marker] = (255, 0, 0)
    return frame


def read_frame_index(rgb: np.ndarray) -> int:
    """The index ``pattern_frame`` drew into an upright decoded (H, W, 3) frame."""
    height, width = rgb.shape[:2]
    strip, cell = _strip_height(height), width // INDEX_BITS
    grey = rgb[: strip - 2, :, :].astype(np.float32).mean(axis=2)
    index = 0
    for bit in range(INDEX_BITS):
        inner = grey[1:, bit * cell + 2 : (bit + 1) * cell - 2]
        index |= int(inner.mean() > 128) << bit
    return index


def marker_is_top_left(rgb: np.ndarray) -> bool:
    """True when the red marker of ``pattern_frame`` sits in the top-left quarter."""
    red = (rgb[..., 0] > 160) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    ys, xs = np.nonzero(red)
    height, width = red.shape
    return len(ys) > 0 and ys.mean() < height / 2 and xs.mean() < width / 2


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class VideoSpec:
    codec: str = "libx264"
    width: int = CASE_SIZE[0]
    height: int = CASE_SIZE[1]
    fps: int = 25
    frames: int = 50
    pix_fmt: str = "yuv420p"
    start: Fraction = Fraction(0)
    rotation: int = 0  # clockwise, like a phone's "rotate" tag
    frame_times: tuple[Fraction, ...] | None = None  # overrides start/fps when set
    options: dict[str, str] | None = None
    time_base: Fraction = VIDEO_TIME_BASE  # AVI stores one tick per frame: use 1/fps there

    def times(self) -> tuple[Fraction, ...]:
        if self.frame_times is not None:
            return self.frame_times
        return tuple(self.start + Fraction(i, self.fps) for i in range(self.frames))

    def encoder_options(self) -> dict[str, str]:
        if self.options is not None:
            return self.options
        if self.codec == "libx264":
            keyint = f"keyint={self.fps}:min-keyint={self.fps}:scenecut=0"
            return {**X264_OPTIONS, "x264-params": keyint}
        if self.codec in ("libvpx", "libvpx-vp9"):
            return {"threads": "1", "deadline": "realtime", "cpu-used": "8", "g": str(self.fps)}
        return {"threads": "1", "g": str(self.fps)}


@dataclass(frozen=True)
class AudioSpec:
    codec: str = "aac"
    rate: int = SAMPLE_RATE
    layout: str = "mono"
    tone_channel: int = 0
    start: Fraction = Fraction(0)
    duration: Fraction = Fraction(2)
    bit_rate: int = 64_000

    @property
    def start_sample(self) -> int:
        return int(self.start * self.rate)

    @property
    def samples(self) -> int:
        return int(self.duration * self.rate)


def _add_video(container: av.container.OutputContainer, spec: VideoSpec) -> av.VideoStream:
    stream = container.add_stream(spec.codec, rate=spec.fps, options=spec.encoder_options())
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
    stream.codec_context.time_base = spec.time_base
    stream.time_base = spec.time_base
    stream.thread_count = 1
    if spec.rotation:
        # PyAV takes counter-clockwise degrees; the phone tag is clockwise
        stream.set_display_rotation(-spec.rotation)
    return stream


def _add_audio(container: av.container.OutputContainer, spec: AudioSpec) -> av.AudioStream:
    stream = container.add_stream(spec.codec, rate=spec.rate, layout=spec.layout)
    stream.bit_rate = spec.bit_rate
    return stream


def _video_frames(spec: VideoSpec) -> Iterator[tuple[Fraction, av.VideoFrame]]:
    for index, when in enumerate(spec.times()):
        frame = av.VideoFrame.from_ndarray(
            pattern_frame(index, spec.width, spec.height), format="rgb24"
        )
        frame.pts = int(when / spec.time_base)
        frame.time_base = spec.time_base
        yield when, frame


def _audio_frames(spec: AudioSpec, chunk: int) -> Iterator[tuple[Fraction, av.AudioFrame]]:
    channels = len(av.AudioLayout(spec.layout).channels)
    for offset in range(0, spec.samples, chunk):
        count = min(chunk, spec.samples - offset)
        planes = np.zeros((channels, count), np.float32)
        planes[spec.tone_channel] = tone(spec.start_sample + offset, count, spec.rate)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=spec.layout)
        frame.sample_rate = spec.rate
        frame.pts = spec.start_sample + offset
        frame.time_base = Fraction(1, spec.rate)
        yield Fraction(frame.pts, spec.rate), frame


def _interleave(
    *sources: Iterator[tuple[Fraction, object]],
) -> Iterator[tuple[int, object]]:
    """(source number, item) in time order, pulling one item ahead from each source."""
    heads = [next(source, None) for source in sources]
    while any(head is not None for head in heads):
        number = min(
            (i for i, head in enumerate(heads) if head is not None), key=lambda i: heads[i][0]
        )
        yield number, heads[number][1]
        heads[number] = next(sources[number], None)


def write_media(
    path: Path,
    container_format: str,
    video: VideoSpec | None,
    audio: AudioSpec | None,
    container_options: dict[str, str] | None = None,
) -> None:
    """Encode the pattern video and tone audio into PATH, streaming (little memory)."""
    options = {**BITEXACT, **(container_options or {})}
    with av.open(str(path), mode="w", format=container_format, options=options) as container:
        streams, sources = [], []
        if video is not None:
            streams.append(_add_video(container, video))
            sources.append(_video_frames(video))
        if audio is not None:
            track = _add_audio(container, audio)
            streams.append(track)
            sources.append(_audio_frames(audio, track.codec_context.frame_size or 1024))
        for number, frame in _interleave(*sources):
            container.mux(streams[number].encode(frame))
        for stream in streams:
            container.mux(stream.encode(None))


# ---------------------------------------------------------------- packets and damage


@dataclass(frozen=True)
class PacketInfo:
    stream_type: str
    index: int  # demux order within its stream
    pos: int
    size: int
    start: float
    end: float
    keyframe: bool


def packet_layout(path: Path) -> list[PacketInfo]:
    """Every packet of PATH (demux order) with its byte range and time span."""
    packets, counts = [], {}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size == 0:
                continue
            kind = packet.stream.type
            index = counts.get(kind, 0)
            counts[kind] = index + 1
            start = float(packet.pts * packet.time_base) if packet.pts is not None else math.nan
            end = start + float((packet.duration or 0) * packet.time_base)
            packets.append(
                PacketInfo(kind, index, packet.pos, packet.size, start, end, packet.is_keyframe)
            )
    return packets


def _payloads(path: Path) -> dict[tuple[str, int], bytes]:
    with av.open(str(path)) as container:
        payloads, counts = {}, {}
        for packet in container.demux():
            if packet.size:
                kind = packet.stream.type
                counts[kind] = counts.get(kind, 0) + 1
                payloads[kind, counts[kind] - 1] = bytes(packet)
    return payloads


def overwrite_packets(
    path: Path, chosen: Sequence[PacketInfo], seed: int, keep_header: int = 0
) -> None:
    """Overwrite the sample bytes of ``chosen`` packets in PATH with seeded random bytes,
    leaving the first ``keep_header`` bytes of each."""
    payloads = _payloads(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for packet in chosen:
        stored = bytes(data[packet.pos : packet.pos + packet.size])
        if stored != payloads[packet.stream_type, packet.index]:
            raise ValueError(
                f"{path}: packet {packet.index} of the {packet.stream_type} stream is not stored "
                f"contiguously at byte {packet.pos}; use a container whose packet.pos points at "
                "the sample data (mp4/mov)"
            )
        start = packet.pos + keep_header
        end = packet.pos + packet.size
        data[start:end] = rng.integers(0, 256, end - start, np.uint8).tobytes()
    path.write_bytes(bytes(data))
