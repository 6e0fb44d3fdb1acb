"""Small media files with known damage or unusual properties, and their ground truth.

Each ``make_*`` function writes one file deterministically (same bytes on every call) and
returns a ``MediaCase`` describing what a decoder should find in it. The content (frame-index
cells, orientation marker, stepped tone) and the writing are media_writing.py's.

Damage is applied at the packet level: the file is written normally, then the byte ranges of
chosen packets (``packet.pos`` / ``packet.size`` from demuxing) are overwritten in place with
seeded random bytes, so sizes and container structure stay intact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

# The content and writing helpers; `X as X` re-exports what tests read frames and tones with.
from data_pipelines.media_writing import (
    INDEX_BITS,
    X264_OPTIONS,
    AudioSpec,
    PacketInfo,
    VideoSpec,
    overwrite_packets,
    packet_layout,
    write_media,
)
from data_pipelines.media_writing import (
    marker_is_top_left as marker_is_top_left,
)
from data_pipelines.media_writing import (
    pattern_frame as pattern_frame,
)
from data_pipelines.media_writing import (
    read_frame_index as read_frame_index,
)
from data_pipelines.media_writing import (
    tone as tone,
)
from data_pipelines.media_writing import (
    tone_frequency as tone_frequency,
)

Span = tuple[float, float]


@dataclass(frozen=True)
class Damage:
    """Packets of one stream whose bytes were overwritten or cut off."""

    packet_indices: tuple[int, ...] = ()  # demux order within the stream
    spans: tuple[Span, ...] = ()  # (start, end) seconds of each damaged packet
    # video only: from each damaged packet to the next keyframe, where the error can spread
    affected_spans: tuple[Span, ...] = ()

    @property
    def packets(self) -> int:
        return len(self.packet_indices)


@dataclass(frozen=True)
class VideoTruth:
    codec: str
    pix_fmt: str
    coded_size: tuple[int, int]  # (width, height) as stored
    display_size: tuple[int, int]  # (width, height) after rotation
    rotation: int  # clockwise degrees a player turns the picture (the phone "rotate" tag)
    fps: float  # nominal rate; the mean rate for variable frame rate
    frame_times: tuple[float, ...]  # presentation time of each source frame, in demux order
    duration: float  # last frame end - first frame start, on the source timeline
    decodable: bool = True
    damage: Damage = field(default_factory=Damage)

    @property
    def start(self) -> float:
        return self.frame_times[0]


@dataclass(frozen=True)
class AudioTruth:
    codec: str
    sample_rate: int
    layout: str
    tone_channel: int  # the only channel that carries the tone; the others are silent
    start: float  # seconds on the source timeline
    duration: float
    decodable: bool = True
    damage: Damage = field(default_factory=Damage)


@dataclass(frozen=True)
class MediaCase:
    path: Path
    description: str
    container: str  # muxer name
    video: VideoTruth | None
    audio: AudioTruth | None

    @property
    def audio_offset(self) -> float:
        """Audio start minus video start, in seconds."""
        if self.video is None or self.audio is None:
            return 0.0
        return self.audio.start - self.video.start


def _middle_picks(candidates: Sequence[PacketInfo], count: int) -> list[PacketInfo]:
    """``count`` packets spread evenly over the middle third of ``candidates``."""
    if count == 0:
        return []
    third = len(candidates) // 3
    middle = candidates[third : len(candidates) - third]
    if count > len(middle):
        raise ValueError(f"cannot damage {count} packets: only {len(middle)} in the middle third")
    step = len(middle) / count
    return [middle[int(i * step + step / 2)] for i in range(count)]


def _next_keyframe(packets: Sequence[PacketInfo], after: PacketInfo) -> float:
    later = [p.start for p in packets if p.keyframe and p.start > after.start]
    return min(later) if later else max(p.end for p in packets)


def _damage(packets: Sequence[PacketInfo], chosen: Sequence[PacketInfo], video: bool) -> Damage:
    affected = tuple((p.start, _next_keyframe(packets, p)) for p in chosen) if video else ()
    return Damage(
        packet_indices=tuple(p.index for p in chosen),
        spans=tuple((p.start, p.end) for p in chosen),
        affected_spans=affected,
    )


# ---------------------------------------------------------------- truth


def _video_truth(spec: VideoSpec, **overrides) -> VideoTruth:
    times = spec.times()
    size = (spec.width, spec.height)
    display = size[::-1] if spec.rotation % 180 else size
    last_gap = Fraction(1, spec.fps)
    truth = VideoTruth(
        codec=_codec_name(spec.codec),
        pix_fmt=spec.pix_fmt,
        coded_size=size,
        display_size=display,
        rotation=spec.rotation,
        fps=float(Fraction(len(times)) / (times[-1] + last_gap - times[0])),
        frame_times=tuple(float(t) for t in times),
        duration=float(times[-1] + last_gap - times[0]),
    )
    return _replace(truth, overrides)


def _audio_truth(spec: AudioSpec, **overrides) -> AudioTruth:
    truth = AudioTruth(
        codec=_codec_name(spec.codec),
        sample_rate=spec.rate,
        layout=spec.layout,
        tone_channel=spec.tone_channel,
        start=float(spec.start),
        duration=float(spec.duration),
    )
    return _replace(truth, overrides)


def _replace(truth, overrides: dict):
    return replace(truth, **overrides) if overrides else truth


def _codec_name(encoder: str) -> str:
    """The decoder-side codec name PyAV reports for streams written by ``encoder``."""
    return {
        "libx264": "h264",
        "libmp3lame": "mp3",
        "libvpx": "vp8",
        "libvpx-vp9": "vp9",
        "libopus": "opus",
    }.get(encoder, encoder)


def _check_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is not a directory; create it first")
    return out_dir


# ---------------------------------------------------------------- 1. corrupt packets

AUDIO_CODECS = {"ac3": "ac3", "aac": "aac", "mp3": "libmp3lame"}
# The demuxer re-splits AC3 and MP3 at their sync headers; keeping each frame header intact
# keeps one demuxed packet per damaged frame instead of merging garbage into a neighbour.
AUDIO_HEADER_BYTES = {"ac3": 8, "aac": 0, "mp3": 4}


def make_corrupt_audio(
    out_dir: Path, codec: str = "aac", damaged_packets: int = 3, seed: int = 0
) -> MediaCase:
    """H.264 + ``codec`` audio mp4 with ``damaged_packets`` audio packets overwritten."""
    if codec not in AUDIO_CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(AUDIO_CODECS)}")
    path = _check_dir(out_dir) / f"corrupt_audio_{codec}.mp4"
    video, audio = VideoSpec(), AudioSpec(codec=AUDIO_CODECS[codec])
    write_media(path, "mp4", video, audio)
    packets = [p for p in packet_layout(path) if p.stream_type == "audio"]
    chosen = _middle_picks(packets, damaged_packets) if damaged_packets else []
    keep = AUDIO_HEADER_BYTES[codec]
    overwrite_packets(path, chosen, seed, keep_header=keep)
    return MediaCase(
        path=path,
        description=(
            f"mp4, {damaged_packets} {codec} packets in the middle overwritten "
            f"after their first {keep} bytes"
        ),
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio, damage=_damage(packets, chosen, video=False)),
    )


def make_corrupt_video(
    out_dir: Path, keyframe: bool = False, damaged_packets: int = 3, seed: int = 0
) -> MediaCase:
    """H.264 + AAC mp4 with non-key (or one key) video packets in the middle overwritten."""
    name = "keyframe" if keyframe else "frames"
    path = _check_dir(out_dir) / f"corrupt_video_{name}.mp4"
    video, audio = VideoSpec(frames=75), AudioSpec(duration=Fraction(3))
    write_media(path, "mp4", video, audio)
    packets = [p for p in packet_layout(path) if p.stream_type == "video"]
    if keyframe:
        middle_keys = [p for p in packets if p.keyframe and p.index > 0]
        chosen = middle_keys[:1]
    else:
        chosen = _middle_picks([p for p in packets if not p.keyframe], damaged_packets)
    overwrite_packets(path, chosen, seed)
    what = "the keyframe at 1 s" if keyframe else f"{len(chosen)} non-key H.264 packets"
    return MediaCase(
        path=path,
        description=f"mp4, {what} overwritten",
        container="mp4",
        video=_video_truth(video, damage=_damage(packets, chosen, video=True)),
        audio=_audio_truth(audio),
    )


# ---------------------------------------------------------------- 2. truncated tail

TRUNCATION_LAYOUTS = {
    "faststart": ("mp4", "mp4", {"movflags": "+faststart"}),
    "moov_at_end": ("mp4", "mp4", {}),
    "matroska": ("matroska", "mkv", {}),
}


def make_truncated_tail(
    out_dir: Path, layout: str = "faststart", fraction: float = 0.7
) -> MediaCase:
    """H.264 + AAC file cut in the middle of the packet at ``fraction`` of its length.

    ``faststart`` mp4 keeps its index (moov) in front, so the head stays decodable;
    ``moov_at_end`` loses its index, so nothing is decodable; ``matroska`` needs no index.
    """
    if layout not in TRUNCATION_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(TRUNCATION_LAYOUTS)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction {fraction} must be inside (0, 1)")
    muxer, extension, options = TRUNCATION_LAYOUTS[layout]
    path = _check_dir(out_dir) / f"truncated_{layout}.{extension}"
    video, audio = VideoSpec(frames=75), AudioSpec(duration=Fraction(3))
    write_media(path, muxer, video, audio, options)
    packets = packet_layout(path)
    data = path.read_bytes()
    target = int(len(data) * fraction)
    cut_packet = min(
        (p for p in packets if p.pos + p.size > target), key=lambda p: abs(p.pos - target)
    )
    cut = cut_packet.pos + cut_packet.size // 2
    path.write_bytes(data[:cut])
    decodable = layout != "moov_at_end"
    truths = {}
    for kind in ("video", "audio"):
        mine = [p for p in packets if p.stream_type == kind]
        lost = [p for p in mine if p.pos + p.size > cut]
        truths[kind] = Damage(
            packet_indices=tuple(p.index for p in lost),
            spans=((lost[0].start, mine[-1].end),) if lost else (),
            affected_spans=((lost[0].start, mine[-1].end),) if lost and kind == "video" else (),
        )
    return MediaCase(
        path=path,
        description=f"{layout} file cut at byte {cut} of {len(data)}, inside a packet",
        container=muxer,
        video=_video_truth(video, damage=truths["video"], decodable=decodable),
        audio=_audio_truth(audio, damage=truths["audio"], decodable=decodable),
    )


# ---------------------------------------------------------------- 3. timestamps

MKV_CLUSTER = b"\x1f\x43\xb6\x75"
MKV_CLUSTER_TIMESTAMP = 0xE7


def _ebml_vint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, length) of the EBML variable-size integer at ``pos``."""
    first = data[pos]
    length = 8 - first.bit_length() + 1
    value = first & ((1 << (8 - length)) - 1)
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    return value, length


def _shift_clusters(data: bytearray, from_ms: int, shift_ms: int) -> int:
    """Add ``shift_ms`` to the timestamp of every Matroska cluster at or after ``from_ms``."""
    shifted, pos = 0, data.find(MKV_CLUSTER)
    while pos >= 0:
        _, size_length = _ebml_vint(data, pos + 4)
        child = pos + 4 + size_length
        if data[child] != MKV_CLUSTER_TIMESTAMP:  # the cluster ID as a SeekHead entry
            pos = data.find(MKV_CLUSTER, pos + 4)
            continue
        width, width_length = _ebml_vint(data, child + 1)
        value_at = child + 1 + width_length
        value = int.from_bytes(data[value_at : value_at + width], "big")
        if value >= from_ms:
            if value + shift_ms < 0 or value + shift_ms >= 1 << (8 * width):
                raise ValueError(f"cluster timestamp {value} ms cannot move by {shift_ms} ms")
            data[value_at : value_at + width] = (value + shift_ms).to_bytes(width, "big")
            shifted += 1
        pos = data.find(MKV_CLUSTER, pos + 4)
    return shifted


def make_timestamp_jump(out_dir: Path, jump_seconds: float = 5.0) -> MediaCase:
    """Video-only file whose timestamps jump by ``jump_seconds`` after 1 s (2 s of frames).

    A forward jump is written natively into mp4; a backward jump, which no muxer accepts, is
    made by rewriting the cluster timestamps of a Matroska file in place.
    """
    if jump_seconds == 0:
        raise ValueError("jump_seconds must be non-zero")
    fps, frames, at_frame = 25, 50, 25
    jump = Fraction(jump_seconds).limit_denominator(1000)
    plain = VideoSpec(fps=fps, frames=frames)
    jumped = tuple(t + (jump if i >= at_frame else 0) for i, t in enumerate(plain.times()))
    direction = "forward" if jump > 0 else "backward"
    if jump > 0:
        path = _check_dir(out_dir) / "timestamp_jump_forward.mp4"
        spec = VideoSpec(fps=fps, frame_times=jumped)
        write_media(path, "mp4", spec, None)
        muxer = "mp4"
    else:
        if -jump > Fraction(at_frame, fps):
            raise ValueError(f"a backward jump of {-jump} s would go before the first frame")
        path = _check_dir(out_dir) / "timestamp_jump_backward.mkv"
        spec = VideoSpec(fps=fps, frame_times=jumped)
        # a cluster starts once it spans more than the limit: this one starts at the jump,
        # and CRC-32 elements are off so the rewritten timestamps leave them valid
        at_ms, frame_ms = 1000 * at_frame // fps, 1000 // fps
        options = {"cluster_time_limit": str(at_ms - frame_ms), "write_crc32": "0"}
        write_media(path, "matroska", plain, None, options)
        data = bytearray(path.read_bytes())
        if _shift_clusters(data, at_ms, int(jump * 1000)) != 1:
            raise ValueError(f"{path}: expected one cluster from {at_ms} ms on")
        path.write_bytes(bytes(data))
        muxer = "matroska"
    truth = _replace(_video_truth(spec), {"fps": float(fps)})
    return MediaCase(
        path=path,
        description=f"video timestamps jump {direction} by {abs(float(jump))} s at 1 s",
        container=muxer,
        video=truth,
        audio=None,
    )


def make_variable_frame_rate(out_dir: Path, frames: int = 60) -> MediaCase:
    """Video-only mp4 whose frame durations alternate between 1/25 s and 1/50 s."""
    durations = [Fraction(1, 25) if i % 2 == 0 else Fraction(1, 50) for i in range(frames)]
    times = tuple(sum(durations[:i], Fraction(0)) for i in range(frames))
    path = _check_dir(out_dir) / "variable_frame_rate.mp4"
    spec = VideoSpec(fps=50, frame_times=times)
    write_media(path, "mp4", spec, None)
    total = sum(durations, Fraction(0))
    truth = _replace(_video_truth(spec), {"duration": float(total), "fps": float(frames / total)})
    return MediaCase(
        path=path,
        description="frame durations alternate 1/25 s and 1/50 s",
        container="mp4",
        video=truth,
        audio=None,
    )


# ---------------------------------------------------------------- 4. rotation


def make_rotated(out_dir: Path, rotation: int = 90) -> MediaCase:
    """Landscape H.264 + AAC mp4 tagged like a portrait phone clip (display matrix)."""
    if rotation not in (90, 180, 270):
        raise ValueError(f"rotation {rotation} must be 90, 180 or 270")
    path = _check_dir(out_dir) / f"rotated_{rotation}.mp4"
    video, audio = VideoSpec(rotation=rotation), AudioSpec()
    write_media(path, "mp4", video, audio)
    return MediaCase(
        path=path,
        description=f"phone clip, display matrix rotates {rotation} degrees clockwise",
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )


# ---------------------------------------------------------------- 5. pixel formats, sizes

PIXEL_CASES = {
    "10bit": VideoSpec(pix_fmt="yuv420p10le"),
    "yuv444": VideoSpec(pix_fmt="yuv444p"),
    # H.264 4:2:0 needs even sides; VP9 takes odd ones, as web re-encodes do
    "odd_size": VideoSpec(codec="libvpx-vp9", width=175, height=97),
}


def make_pixel_format(out_dir: Path, kind: str = "10bit") -> MediaCase:
    """Video-only file in an unusual pixel format or size (see ``PIXEL_CASES``)."""
    if kind not in PIXEL_CASES:
        raise ValueError(f"kind {kind!r} is not one of {sorted(PIXEL_CASES)}")
    spec = PIXEL_CASES[kind]
    muxer, extension = ("webm", "webm") if spec.codec == "libvpx-vp9" else ("mp4", "mp4")
    path = _check_dir(out_dir) / f"pixel_{kind}.{extension}"
    write_media(path, muxer, spec, None)
    return MediaCase(
        path=path,
        description=f"{spec.codec} {spec.pix_fmt} {spec.width}x{spec.height}",
        container=muxer,
        video=_video_truth(spec),
        audio=None,
    )


# ---------------------------------------------------------------- 6. containers, 5.1

# AVI carries PCM: with MP3 beside it, FFmpeg's AVI demuxer was seen to shift the second
# video frame by one tick
CONTAINER_CASES = {
    "avi": (
        "avi",
        "avi",
        VideoSpec(codec="mpeg4", time_base=Fraction(1, 25)),
        AudioSpec(codec="pcm_s16le"),
    ),
    "mkv": ("matroska", "mkv", VideoSpec(), AudioSpec(codec="ac3")),
    "mov": ("mov", "mov", VideoSpec(), AudioSpec(codec="aac")),
    "webm": ("webm", "webm", VideoSpec(codec="libvpx-vp9"), AudioSpec(codec="libopus")),
}


def make_container(out_dir: Path, kind: str = "mkv") -> MediaCase:
    """Video + audio in the container ``kind`` (see ``CONTAINER_CASES``)."""
    if kind not in CONTAINER_CASES:
        raise ValueError(f"kind {kind!r} is not one of {sorted(CONTAINER_CASES)}")
    muxer, extension, video, audio = CONTAINER_CASES[kind]
    path = _check_dir(out_dir) / f"container.{extension}"
    write_media(path, muxer, video, audio)
    return MediaCase(
        path=path,
        description=f"{muxer}: {video.codec} + {audio.codec}",
        container=muxer,
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )


# the names the decoders report back; the centre is the third channel of both
SURROUND_LAYOUTS = {"ac3": "5.1(side)", "aac": "5.1"}
CENTRE_CHANNEL = 2


def make_surround(out_dir: Path, codec: str = "ac3") -> MediaCase:
    """H.264 + 5.1 ``codec`` audio (mp4) with the tone in the centre channel only."""
    if codec not in ("ac3", "aac"):
        raise ValueError(f"codec {codec!r} must be 'ac3' or 'aac'")
    path = _check_dir(out_dir) / f"surround_{codec}.mp4"
    video = VideoSpec()
    audio = AudioSpec(
        codec=codec, layout=SURROUND_LAYOUTS[codec], tone_channel=CENTRE_CHANNEL, bit_rate=192_000
    )
    write_media(path, "mp4", video, audio)
    return MediaCase(
        path=path,
        description=f"{codec} {SURROUND_LAYOUTS[codec]}, tone in the centre channel only",
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )


# ---------------------------------------------------------------- 7. offsets, lengths


def make_audio_offset(out_dir: Path, offset_seconds: float = 0.5) -> MediaCase:
    """H.264 + AAC mp4 whose audio starts ``offset_seconds`` after (or before) the video."""
    offset = Fraction(offset_seconds).limit_denominator(1000)
    video_start, audio_start = (Fraction(0), offset) if offset >= 0 else (-offset, Fraction(0))
    name = "late" if offset >= 0 else "early"
    path = _check_dir(out_dir) / f"audio_{name}.mp4"
    video, audio = VideoSpec(start=video_start), AudioSpec(start=audio_start)
    write_media(path, "mp4", video, audio)
    return MediaCase(
        path=path,
        description=f"audio starts {float(offset):+} s relative to the video",
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )


def make_length_mismatch(out_dir: Path, audio_extra_seconds: float = 1.0) -> MediaCase:
    """H.264 + AAC mp4: 2 s of video, audio ``audio_extra_seconds`` longer (or shorter)."""
    extra = Fraction(audio_extra_seconds).limit_denominator(1000)
    video = VideoSpec(frames=50)
    if Fraction(2) + extra <= 0:
        raise ValueError(f"audio_extra_seconds {audio_extra_seconds} leaves no audio")
    audio = AudioSpec(duration=Fraction(2) + extra)
    name = "longer" if extra >= 0 else "shorter"
    path = _check_dir(out_dir) / f"audio_{name}.mp4"
    write_media(path, "mp4", video, audio)
    return MediaCase(
        path=path,
        description=f"audio {abs(float(extra))} s {name} than the 2 s video",
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )


# ---------------------------------------------------------------- all cases, long source


def all_case_makers() -> dict[str, Callable[[Path], MediaCase]]:
    """Name -> maker with default arguments, one per case."""
    makers: dict[str, Callable[[Path], MediaCase]] = {}
    for codec in AUDIO_CODECS:
        makers[f"corrupt_audio_{codec}"] = lambda d, c=codec: make_corrupt_audio(d, c)
    makers["corrupt_video_frames"] = lambda d: make_corrupt_video(d, keyframe=False)
    makers["corrupt_video_keyframe"] = lambda d: make_corrupt_video(d, keyframe=True)
    for layout in TRUNCATION_LAYOUTS:
        makers[f"truncated_{layout}"] = lambda d, x=layout: make_truncated_tail(d, x)
    makers["timestamp_jump_forward"] = lambda d: make_timestamp_jump(d, 5.0)
    makers["timestamp_jump_backward"] = lambda d: make_timestamp_jump(d, -0.6)
    makers["variable_frame_rate"] = make_variable_frame_rate
    for rotation in (90, 270):
        makers[f"rotated_{rotation}"] = lambda d, r=rotation: make_rotated(d, r)
    for kind in PIXEL_CASES:
        makers[f"pixel_{kind}"] = lambda d, k=kind: make_pixel_format(d, k)
    for kind in CONTAINER_CASES:
        makers[f"container_{kind}"] = lambda d, k=kind: make_container(d, k)
    for codec in ("ac3", "aac"):
        makers[f"surround_{codec}"] = lambda d, c=codec: make_surround(d, c)
    makers["audio_late"] = lambda d: make_audio_offset(d, 0.5)
    makers["audio_early"] = lambda d: make_audio_offset(d, -0.5)
    makers["audio_longer"] = lambda d: make_length_mismatch(d, 1.0)
    makers["audio_shorter"] = lambda d: make_length_mismatch(d, -1.0)
    return makers


def make_all(out_dir: Path) -> dict[str, MediaCase]:
    """Every case with default arguments, each in its own subfolder of OUT_DIR."""
    cases = {}
    for name, maker in all_case_makers().items():
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        cases[name] = maker(folder)
    return cases


@dataclass(frozen=True)
class LongSource:
    case: MediaCase
    write_seconds: float


def make_long_source(
    out_dir: Path, minutes: float, width: int = 320, height: int = 240, fps: int = 25
) -> LongSource:
    """A long talk-like H.264 + AAC mp4 (slowly moving pattern, tone), streamed to disk."""
    if minutes <= 0:
        raise ValueError(f"minutes {minutes} must be positive")
    frames = int(minutes * 60 * fps)
    if frames >= 1 << INDEX_BITS:
        raise ValueError(f"{frames} frames exceed the {INDEX_BITS}-bit frame index; lower fps")
    path = _check_dir(out_dir) / f"long_{minutes:g}min.mp4"
    options = {**X264_OPTIONS, "preset": "ultrafast", "g": str(fps * 2)}
    video = VideoSpec(width=width, height=height, fps=fps, frames=frames, options=options)
    audio = AudioSpec(duration=Fraction(frames, fps))
    began = time.perf_counter()
    write_media(path, "mp4", video, audio)
    elapsed = time.perf_counter() - began
    case = MediaCase(
        path=path,
        description=f"{minutes:g} min talk-like source, {width}x{height} at {fps} fps",
        container="mp4",
        video=_video_truth(video),
        audio=_audio_truth(audio),
    )
    return LongSource(case=case, write_seconds=elapsed)
