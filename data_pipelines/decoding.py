"""Decode a source once, as streams: video frames at the target rate, one at a time, and the
mono audio track spilled to a temporary file, with an account of the damage survived.

Memory does not grow with the source's length: the video is consumed frame by frame by the
clip cutter, and the audio (16 kHz float32 is ~3.8 MB a minute) waits on disk until a clip
reads its slice.

Damage is survived, not fatal. An undecodable packet is skipped and the timeline stays
aligned: the video holds its last frame over the gap and the audio is filled with silence.
A timestamp jump (a gap longer than ``max_gap_seconds`` with nothing dropped around it, or a
step backwards) is closed up: the stream continues one frame or hop later, and the clip
cutter starts a new clip there. Every event is kept with its span on the output timeline
(0 = the first video frame), so each clip can report the damage inside it. Only a stream that
yields nothing at all is absent.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from data_pipelines.probe import RejectedInput

log = logging.getLogger(__name__)

# Decoders report damage instead of concealing it: checksums (AC3, some MP3) are verified and
# any bitstream error fails the packet, which is then counted and skipped.
ERROR_DETECTION = {"err_detect": "crccheck+bitstream+buffer+explode"}


@dataclass(frozen=True)
class DamageEvent:
    stream: str  # "video" or "audio"
    kind: str  # "dropped_packet", "timestamp_jump" or "truncated"
    start: float  # seconds on the output timeline
    end: float
    packets: int = 0


@dataclass
class DamageLog:
    events: list[DamageEvent] = field(default_factory=list)
    added: int = 0  # every add(), merged or not: "was something lost since?"

    def add(self, stream: str, kind: str, start: float, end: float, packets: int = 0) -> None:
        self.added += 1
        last = self.events[-1] if self.events else None
        # Consecutive dropped packets of one stream are one event (a damaged stretch).
        if (
            last is not None
            and kind == last.kind == "dropped_packet"
            and stream == last.stream
            and start <= last.end + 1e-6
        ):
            self.events[-1] = DamageEvent(
                stream, kind, last.start, max(last.end, end), last.packets + packets
            )
            return
        self.events.append(DamageEvent(stream, kind, start, max(start, end), packets))

    def within(self, start: float, end: float) -> dict[str, float | int]:
        """Packets dropped and seconds lost per stream, and timestamp jumps, in [start, end)."""
        summary: dict[str, float | int] = {
            "video_packets_dropped": 0,
            "video_seconds_dropped": 0.0,
            "audio_packets_dropped": 0,
            "audio_seconds_dropped": 0.0,
            "timestamp_jumps": 0,
        }
        for event in self.events:
            overlap = min(end, event.end) - max(start, event.start)
            point_inside = event.start == event.end and start <= event.start < end
            if overlap <= 0 and not point_inside:
                continue
            if event.kind == "timestamp_jump":
                summary["timestamp_jumps"] += 1
                continue
            summary[f"{event.stream}_packets_dropped"] += event.packets
            summary[f"{event.stream}_seconds_dropped"] += max(0.0, overlap)
        for key in ("video_seconds_dropped", "audio_seconds_dropped"):
            summary[key] = round(float(summary[key]), 6)
        return summary

    def as_rows(self) -> list[dict]:
        return [asdict(event) for event in self.events]


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_side, both even."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _packets(container, stream, damage: DamageLog, name: str, to_output) -> Iterator:
    """The stream's packets; a demuxer error (a truncated or torn file) ends the stream."""
    last_end = 0.0
    time_base = float(stream.time_base or 0)  # a float: Fraction arithmetic per packet is slow
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.duration:
                last_end = to_output((packet.pts + packet.duration) * time_base)
            yield packet
    except av.error.FFmpegError as err:
        log.info("%s stream ends early: %s", name, err)
        damage.add(name, "truncated", last_end, last_end)


def _decode(packet, damage: DamageLog, name: str, to_output) -> list:
    """The packet's frames, or none when it does not decode (the loss is logged)."""
    try:
        return packet.decode()
    except av.error.FFmpegError:
        if packet.pts is not None:
            start = to_output(float(packet.pts * packet.time_base))
            end = start + float((packet.duration or 0) * packet.time_base)
        else:
            start = end = damage.events[-1].end if damage.events else 0.0
        damage.add(name, "dropped_packet", start, end, packets=1)
        return []


class Timeline:
    """A stream's timestamps mapped onto a continuous output timeline: jumps closed up."""

    def __init__(self, max_gap: float) -> None:
        self.max_gap = max_gap
        self.origin: float | None = None  # the stream time of output time 0
        self.shift = 0.0  # seconds removed by closed-up jumps so far
        self.last: float | None = None
        self.jumped = False  # set when the last place() closed a jump

    def place(self, time: float, step: float, dropped_before: bool) -> float:
        if self.origin is None:
            self.origin = time
        out = time - self.origin - self.shift
        self.jumped = False
        if self.last is not None:
            gap = out - self.last
            if gap < -step / 2 or (gap > self.max_gap and not dropped_before):
                self.shift += gap - step
                out = self.last + step
                self.jumped = True
        self.last = out
        return out

    def to_output(self, time: float) -> float:
        return time - (self.origin or 0.0) - self.shift


@dataclass(frozen=True)
class VideoFrameOut:
    image: np.ndarray  # (H, W, 3) uint8 RGB, upright
    # The same frame as the encoder takes it: yuv420p planes packed as PyAV packs them,
    # (H * 3 / 2, W) uint8 (Y, then U, then V), in the source's colour matrix. Scaling
    # happens in YUV, so a stored clip's colours make no round trip through RGB.
    planes: np.ndarray
    new_shot: bool  # a timestamp jump precedes this frame: no clip may span it
    colorspace: int = 2  # the planes' matrix (FFmpeg's AVColorSpace; 2 = unspecified)


def video_frames(
    path: Path,
    fps: float,
    max_side: int,
    damage: DamageLog,
    max_gap: float,
    on_origin: Callable[[float], None] | None = None,
    threads: int = 1,
) -> Iterator[VideoFrameOut]:
    """Frames at ``fps``, each the source frame nearest its time (the last one held over a
    gap), upright (rotation metadata applied), scaled to fit ``max_side``. ``threads``: decoder
    threads (0 = FFmpeg's choice); 1 spends the least CPU per frame."""
    emitted = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise RejectedInput("no_video", "the file has no video stream")
        stream = container.streams.video[0]
        if threads == 1:
            stream.codec_context.thread_count = 1
        else:  # frame threads cost CPU (about a third more here) for a shorter wait
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        stream.codec_context.options = dict(ERROR_DETECTION)
        period = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps
        timeline = Timeline(max_gap)
        previous: tuple[av.VideoFrame, float] | None = None
        convert = None
        index = 0
        losses = damage.added
        unseen = _UnseenPackets(float(stream.time_base or 0))
        for packet in _packets(container, stream, damage, "video", timeline.to_output):
            before = damage.added
            decoded = _decode(packet, damage, "video", timeline.to_output)
            unseen.sent(packet, failed=damage.added > before)
            for frame in decoded:
                raw = frame.time if frame.time is not None else index * period
                index += 1
                lost = unseen.lost_before(raw)
                if lost:  # packets that decoded to nothing (e.g. after a damaged keyframe)
                    gap_start = timeline.to_output(lost[0])
                    damage.add("video", "dropped_packet", gap_start, timeline.to_output(raw),
                               packets=len(lost))  # fmt: skip
                dropped, losses = damage.added > losses, damage.added
                time = timeline.place(raw, period, dropped)
                if timeline.jumped:
                    damage.add("video", "timestamp_jump", time, time)
                if convert is None:
                    convert = _converter(frame, max_side)
                    if on_origin is not None:  # output time 0 is this frame's stream time
                        on_origin(float(timeline.origin))
                new_shot = timeline.jumped
                while emitted / fps <= time:
                    target = emitted / fps
                    use_previous = previous is not None and (
                        target < time - period / 2 or target - previous[1] < time - target
                    )
                    image, planes = convert(previous[0] if use_previous else frame)
                    yield VideoFrameOut(
                        image, planes, new_shot and not use_previous, convert.colorspace
                    )
                    new_shot = new_shot and use_previous
                    emitted += 1
                previous = (frame, time)
        # The last frame is shown for one source frame period.
        while previous is not None and emitted / fps < previous[1] + period / 2:
            yield VideoFrameOut(*convert(previous[0]), False, convert.colorspace)
            emitted += 1
    if emitted == 0:
        raise RejectedInput("no_frames", "the video stream decodes to no frames")


class _UnseenPackets:
    """Video packets sent to the decoder whose frame has not come out yet. When a frame comes
    out, a packet sent before its own with an earlier time that is still missing was lost
    without an error (a decoder drops the frames that depend on a damaged keyframe)."""

    KEEP = 256  # packets remembered; far more than any decoder's delay

    def __init__(self, time_base: float) -> None:
        self.time_base = time_base
        self.pending: list[tuple[int, float]] = []  # (send order, time)
        self.sent_count = 0

    def sent(self, packet, failed: bool) -> None:
        if packet.pts is not None and packet.size and not failed:
            self.pending.append((self.sent_count, packet.pts * self.time_base))
            del self.pending[: -self.KEEP]
        self.sent_count += 1

    def lost_before(self, time: float) -> list[float]:
        own = next((order for order, t in self.pending if abs(t - time) < 1e-6), None)
        if own is None:  # a frame time that is no packet's: nothing can be concluded
            return []
        lost = sorted(t for order, t in self.pending if order < own and t < time - 1e-6)
        self.pending = [
            (order, t)
            for order, t in self.pending
            if order != own and not (order < own and t < time - 1e-6)
        ]
        return lost


def _converter(first: av.VideoFrame, max_side: int):
    """frame -> (upright RGB, upright yuv420p planes) at the output size (the size fixed by
    the first frame). A frame held over several output frames is converted once."""
    rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
    upright_w, upright_h = first.width, first.height
    if rotation in (90, 270):
        upright_w, upright_h = upright_h, upright_w
    out_w, out_h = output_size(upright_w, upright_h, max_side)
    scaled = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)
    # One scaler per conversion for the whole source: frame.reformat builds a new one per
    # call, which costs ~10x the conversion itself. One thread each: swscale's own threads
    # cost ~50 % more CPU, and the job's parallelism is its workers.
    to_yuv, to_rgb = VideoReformatter(), VideoReformatter()
    last: tuple[av.VideoFrame | None, tuple[np.ndarray, np.ndarray] | None] = (None, None)

    def convert(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray]:
        nonlocal last
        if last[0] is frame and last[1] is not None:
            return last[1]
        # The planes keep the source's matrix (the stored clip is tagged with it: swscale's
        # YUV-to-YUV matrix change was seen to shift every level by ~4), and RGB is read from
        # them with that matrix. Scaling the planes costs about half of scaling RGB.
        yuv = to_yuv.reformat(frame, width=scaled[0], height=scaled[1], format="yuv420p",
                              interpolation="AREA", threads=1)  # fmt: skip
        image = to_rgb.reformat(yuv, format="rgb24", threads=1).to_ndarray()
        planes = yuv.to_ndarray()
        if rotation:
            # `rotation` is the display matrix's counter-clockwise turn (a phone's clockwise
            # "rotate=90" tag reads -90, i.e. 270 here); np.rot90 turns counter-clockwise.
            image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
            planes = rotate_planes(planes, rotation // 90)
        last = (frame, (image, planes))
        return image, planes

    convert.colorspace = int(first.colorspace)
    return convert


def rotate_planes(planes: np.ndarray, quarter_turns: int) -> np.ndarray:
    """yuv420p planes packed (H * 3 / 2, W) turned counter-clockwise like np.rot90."""
    height, width = planes.shape[0] * 2 // 3, planes.shape[1]
    flat = planes.reshape(-1)
    chroma = height * width // 4
    luma = flat[: height * width].reshape(height, width)
    u = flat[height * width : height * width + chroma].reshape(height // 2, width // 2)
    v = flat[height * width + chroma :].reshape(height // 2, width // 2)
    turned = [np.rot90(plane, k=quarter_turns).reshape(-1) for plane in (luma, u, v)]
    new_width = height if quarter_turns % 2 else width
    return np.concatenate(turned).reshape(-1, new_width)


class AudioTrack:
    """The source's audio as mono float32 at ``sample_rate``, kept in a temporary file;
    ``slice`` reads a span of the output timeline (silence outside the track)."""

    def __init__(
        self, file: Path, num_samples: int, sample_rate: int, start: float, origin: float
    ) -> None:
        self.file, self.num_samples, self.sample_rate = file, num_samples, sample_rate
        self.start = start  # output time of sample 0
        self.origin = origin  # the stream time of output time 0

    def align(self, video_origin: float, damage: DamageLog) -> None:
        """Put the track (and the audio damage it logged) on the video's timeline, once the
        first video frame's time is known: output time 0 is that frame."""
        shift = self.origin - video_origin
        self.start += shift
        self.origin = video_origin
        damage.events = [
            replace(e, start=e.start + shift, end=e.end + shift) if e.stream == "audio" else e
            for e in damage.events
        ]

    @classmethod
    def decode(
        cls,
        path: Path,
        sample_rate: int,
        video_origin: float | None,
        damage: DamageLog,
        max_gap: float,
        spill_dir: str | None = None,
    ) -> AudioTrack | None:
        """None when the file has no audio stream or it yields no sample at all. Without
        ``video_origin`` the track's own first frame is time 0 until ``align``."""
        fd, name = tempfile.mkstemp(prefix="omni-audio-", suffix=".f32", dir=spill_dir)
        file = Path(name)
        written = 0
        first_out: float | None = None
        try:
            with os.fdopen(fd, "wb") as out, av.open(str(path)) as container:
                if not container.streams.audio:
                    file.unlink()
                    return None
                stream = container.streams.audio[0]
                stream.codec_context.options = dict(ERROR_DETECTION)
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                timeline = Timeline(max_gap)
                timeline.origin = video_origin
                losses = damage.added
                hop = 1.0 / sample_rate

                def to_output(time: float) -> float:
                    return timeline.to_output(time)

                for packet in _packets(container, stream, damage, "audio", to_output):
                    for frame in _decode(packet, damage, "audio", to_output):
                        dropped, losses = damage.added > losses, damage.added
                        chunk = _resampled(resampler, frame)
                        if frame.time is None:
                            expected = written
                        else:
                            time = timeline.place(frame.time, hop, dropped)
                            if first_out is None:
                                first_out = time
                            expected = round((time - first_out) * sample_rate)
                            if timeline.jumped:
                                damage.add("audio", "timestamp_jump", time, time)
                        if first_out is None:
                            first_out = 0.0
                        gap = expected - written
                        if gap > 0 and (dropped or gap > 0.02 * sample_rate):
                            out.write(np.zeros(gap, np.float32).tobytes())
                            written += gap
                            if not dropped:  # a hole in the timestamps, no decode error
                                per_packet = frame.samples / max(frame.sample_rate, 1)
                                damage.add(
                                    "audio",
                                    "dropped_packet",
                                    first_out + (written - gap) / sample_rate,
                                    first_out + written / sample_rate,
                                    packets=max(1, round(gap / sample_rate / per_packet)),
                                )
                        elif gap < 0:
                            chunk = chunk[min(len(chunk), -gap) :]  # overlap: keep one copy
                        out.write(chunk.tobytes())
                        written += len(chunk)
                tail = _resampled(resampler, None)
                out.write(tail.tobytes())
                written += len(tail)
        except av.error.FFmpegError as err:
            log.info("%s: audio not decodable (%s)", path, err)
            written = 0
        if written == 0:
            file.unlink(missing_ok=True)
            return None
        return cls(file, written, sample_rate, first_out or 0.0, timeline.origin or 0.0)

    def slice(self, start: float, end: float) -> np.ndarray:
        """Samples of output time [start, end): exactly round(end*sr) - round(start*sr)."""
        sr = self.sample_rate
        lo, hi = round(start * sr), round(end * sr)
        offset = round(self.start * sr)
        a, b = max(lo - offset, 0), min(hi - offset, self.num_samples)
        out = np.zeros(hi - lo, np.float32)
        if b > a:
            data = np.fromfile(self.file, np.float32, count=b - a, offset=4 * a)
            out[a + offset - lo : a + offset - lo + len(data)] = data
        return out

    def chunks(self, samples: int) -> Iterator[np.ndarray]:
        """The whole track in pieces of ``samples`` (for track-wide statistics)."""
        with open(self.file, "rb") as f:
            while True:
                data = np.fromfile(f, np.float32, count=samples)
                if len(data) == 0:
                    return
                yield data

    def close(self) -> None:
        self.file.unlink(missing_ok=True)


def _resampled(resampler: av.AudioResampler, frame) -> np.ndarray:
    pieces = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
