"""Open an input with PyAV and describe its streams, or say exactly why it cannot be used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av


class RejectedInput(Exception):
    """An input (or a clip of it) left out of the shards; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Probe:
    duration: float | None  # seconds; None when the container does not say
    fps: float | None
    width: int
    height: int
    has_audio: bool
    video_codec: str


def probe_video(path: Path, min_seconds: float) -> Probe:
    """Streams, size and duration of ``path``; raises RejectedInput with the reason."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise RejectedInput("missing", f"cannot stat the file: {err}") from err
    if size == 0:
        raise RejectedInput("empty_file", "the file has 0 bytes")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                kinds = sorted({stream.type for stream in container.streams}) or ["none"]
                raise RejectedInput(
                    "no_video_stream", f"the file has no video stream (streams: {', '.join(kinds)})"
                )
            stream = container.streams.video[0]
            if not stream.codec_context.width or not stream.codec_context.height:
                raise RejectedInput("unreadable", "the video stream has no frame size")
            probe = Probe(
                duration=_duration(container, stream),
                fps=float(stream.average_rate) if stream.average_rate else None,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                has_audio=bool(container.streams.audio),
                video_codec=stream.codec_context.name,
            )
    except RejectedInput:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        # strerror leaves out the file's path, so rejects do not depend on where input_dir is.
        why = getattr(err, "strerror", None) or str(err)
        raise RejectedInput("unreadable", f"not a readable video container ({why})") from err
    if probe.duration is not None and probe.duration < min_seconds:
        raise RejectedInput(
            "too_short", f"{probe.duration:.2f} s is shorter than min_clip_seconds={min_seconds}"
        )
    return probe


def _duration(container: av.container.InputContainer, stream: av.video.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    if stream.frames and stream.average_rate:
        return stream.frames / float(stream.average_rate)
    return None
