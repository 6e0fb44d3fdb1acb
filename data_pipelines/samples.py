"""One input video -> its shard samples (mp4 + json per clip) or the reason it is left out.

``process_source`` is a pure function of the file, its sidecars and the config, so it gives
the same bytes every time and can run in any worker process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import numpy as np

from data_pipelines import measures
from data_pipelines.annotations import Sidecars, read_sidecars
from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.annotators.base import run_timed
from data_pipelines.clips import Clip, ShotCutter
from data_pipelines.config import ShardConfig
from data_pipelines.decoding import AudioTrack, DamageLog, video_frames
from data_pipelines.media import UNSPECIFIED_COLORSPACE, encode_mp4
from data_pipelines.probe import RejectedInput, probe_video
from data_pipelines.tags import condition_tiers
from omni_train.contracts import SHARD_MEMBERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spooled:
    """Bytes waiting in a source's spool file (see ClipSpool)."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)


class ClipSpool:
    """A source's encoded clips on disk until the shard writer takes them, so the output of
    an hour-long source does not sit in memory (nor travel through a worker pipe)."""

    def __init__(self, spill_dir: str | None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="omni-clips-", suffix=".bin", dir=spill_dir)
        self._file = os.fdopen(fd, "wb")
        self._offset = 0

    def put(self, data: bytes) -> Spooled:
        self._file.write(data)
        spooled = Spooled(self.path, self._offset, len(data))
        self._offset += len(data)
        return spooled

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Sample:
    key: str
    payload: bytes | Spooled  # the mp4
    meta: dict

    @property
    def mp4(self) -> bytes:
        return self.payload.read() if isinstance(self.payload, Spooled) else self.payload

    def _json(self) -> bytes:
        return json.dumps(self.meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def members(self) -> dict[str, bytes]:
        """Tar members by extension (contracts.SHARD_MEMBERS), in the order they are written."""
        data = {"json": self._json, "mp4": lambda: self.mp4}
        return {name: data[name]() for name in SHARD_MEMBERS}

    @property
    def size(self) -> int:
        payload = self.payload
        return len(self._json()) + (
            payload.length if isinstance(payload, Spooled) else len(payload)
        )


@dataclass(frozen=True)
class SourceResult:
    source: str
    samples: list[Sample] = field(default_factory=list)
    # Rows for rejects.jsonl: the whole input, or single clips of it.
    rejects: list[dict] = field(default_factory=list)
    # Seconds spent per stage: "decode_audio", "decode_video", "cut", "encode",
    # "annotate/NAME" per annotator, and "total".
    timings: dict[str, float] = field(default_factory=dict)
    spool: str | None = None  # the file holding the samples' mp4s, removed by release()

    def release(self) -> None:
        """Remove the spool file once the samples are written (or given up)."""
        if self.spool is not None:
            Path(self.spool).unlink(missing_ok=True)


def source_id(source: str) -> str:
    """First 16 hex chars of the sha1 of the input's posix path relative to input_dir."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CaptionChoice:
    text: str
    origin: str  # "manifest", "sidecar" or "none"


def process_source(
    path: Path, source: str, cfg: ShardConfig, caption: str | None = None, spool: bool = False
) -> SourceResult:
    """Probe, decode, split, annotate, tag and encode one input. Never raises for a bad
    input (it becomes a reject); raises AnnotatorUnavailable, a setting to fix.
    ``caption`` comes from the captions manifest and wins over a NAME.txt sidecar. With
    ``spool`` the clips' mp4s wait in a file (``result.release()`` removes it), not in memory."""
    started = time.perf_counter()
    try:
        result = _process(path, source, cfg, caption, spool)
        result.timings["total"] = time.perf_counter() - started
        return result
    except AnnotatorUnavailable:
        raise
    except RejectedInput as err:
        return SourceResult(
            source, rejects=[{"source": source, "reason": err.reason, "detail": err.detail}]
        )
    except Exception as err:  # noqa: BLE001 - one bad input must never stop the job
        log.exception("unexpected failure on %s", path)
        return SourceResult(
            source,
            rejects=[
                {
                    "source": source,
                    "reason": "internal_error",
                    "detail": f"{type(err).__name__}: {err}",
                }
            ],
        )


def _process(
    path: Path, source: str, cfg: ShardConfig, caption: str | None, spooled: bool
) -> SourceResult:
    probe_video(path, cfg.min_clip_seconds)
    sidecars = read_sidecars(path)
    chosen = CaptionChoice(sidecars.caption, "sidecar" if sidecars.caption else "none")
    if caption is not None:
        chosen = CaptionChoice(" ".join(caption.split()), "manifest")
    damage = DamageLog()
    timings = Timings()
    with timings.stage("decode_audio"):
        audio = AudioTrack.decode(
            path,
            cfg.audio_sample_rate,
            None,  # aligned once the first video frame is decoded
            damage,
            cfg.max_gap_seconds,
            cfg.spill_dir or None,
        )
    spool = ClipSpool(cfg.spill_dir or None) if spooled else None
    try:
        result = _cut_and_measure(
            path, source, cfg, sidecars, chosen, damage, audio, timings, spool
        )
    except BaseException:
        if spool is not None:
            spool.close()
            Path(spool.path).unlink(missing_ok=True)
        raise
    finally:
        if audio is not None:
            audio.close()
    if spool is None:
        return result
    spool.close()
    return replace(result, spool=spool.path)


def _cut_and_measure(
    path: Path,
    source: str,
    cfg: ShardConfig,
    sidecars: Sidecars,
    caption: CaptionChoice,
    damage: DamageLog,
    audio: AudioTrack | None,
    timings: Timings,
    spool: ClipSpool | None,
) -> SourceResult:
    """Stream the video through the shot cutter; each clip is measured and encoded as soon
    as it is complete, so memory holds one clip whatever the source's length."""
    fps = cfg.fps
    clip_frames = max(1, round(cfg.clip_seconds * fps))
    min_frames = max(1, math.ceil(cfg.min_clip_seconds * fps - 1e-6))
    floor = track_noise_floor(audio, cfg.vad) if audio is not None else None
    cutter = ShotCutter(cfg.shot_threshold, clip_frames, min_frames)
    result = SourceResult(source, timings=timings.seconds)
    context = _SourceContext(
        path, source, sidecars, caption, damage, audio, floor, cfg, timings, spool
    )
    frames = 0
    colorspace = UNSPECIFIED_COLORSPACE  # the source's, from its first frame

    def align_audio(origin: float) -> None:
        if audio is not None:
            audio.align(origin, damage)

    decoded = video_frames(
        path, fps, cfg.max_side, damage, cfg.max_gap_seconds, align_audio, cfg.decode_threads
    )
    try:
        while True:
            with timings.stage("decode_video"):
                out = next(decoded, None)
            if out is None:
                break
            frames += 1
            with timings.stage("cut"):
                clips = cutter.push(out.image, out.new_shot, out.planes)
            colorspace = out.colorspace
            for clip in clips:
                index = len(result.samples) + len(result.rejects)
                _add(result, _make_sample(context, index, clip, colorspace))
        for clip in cutter.finish():
            index = len(result.samples) + len(result.rejects)
            _add(result, _make_sample(context, index, clip, colorspace))
    except av.error.FFmpegError as err:
        why = getattr(err, "strerror", None) or str(err)
        raise RejectedInput("decode_error", f"the video stream stops decoding ({why})") from err
    if frames < min_frames:
        raise RejectedInput(
            "too_short",
            f"{frames} frames at {fps} fps, fewer than the {min_frames} of "
            f"min_clip_seconds={cfg.min_clip_seconds}",
        )
    if not result.samples and not result.rejects:
        raise RejectedInput(
            "no_usable_clip",
            f"no shot is at least min_clip_seconds={cfg.min_clip_seconds} long",
        )
    if not result.samples:
        raise RejectedInput(
            "no_usable_clip",
            f"all {len(result.rejects)} clips were left out: "
            + ", ".join(sorted({r["reason"] for r in result.rejects})),
        )
    return result


def _add(result: SourceResult, sample: Sample | dict) -> None:
    if isinstance(sample, dict):
        result.rejects.append(sample)
    else:
        result.samples.append(sample)


@dataclass(frozen=True)
class _SourceContext:
    path: Path
    source: str
    sidecars: Sidecars
    caption: CaptionChoice
    damage: DamageLog
    audio: AudioTrack | None
    floor: float | None
    cfg: ShardConfig
    timings: Timings
    spool: ClipSpool | None


def track_noise_floor(track: AudioTrack, vad) -> float:
    """measures.noise_floor_dbfs of the whole track, read from disk in pieces: the same hop
    windows (overlapping pieces by one window less one hop), so the same figure."""
    sr = track.sample_rate
    frame = max(1, round(vad.frame_seconds * sr))
    hop = max(1, round(vad.hop_seconds * sr))
    if track.num_samples < frame:
        return measures.noise_floor_dbfs(track.slice(track.start, track.start + 1e9), sr, vad)
    hops_per_piece = 4096
    energies, carry = [], np.zeros(0, np.float32)
    for chunk in track.chunks(hops_per_piece * hop):
        data = np.concatenate([carry, chunk])
        usable = (len(data) - frame) // hop + 1 if len(data) >= frame else 0
        if usable > 0:
            energies.append(measures.hop_energies_dbfs(data[: (usable - 1) * hop + frame], sr, vad))
            data = data[usable * hop :]
        carry = data
    return float(np.percentile(np.concatenate(energies), 10))


def _make_sample(
    context: _SourceContext, clip_index: int, clip: Clip, colorspace: int
) -> Sample | dict:
    cfg = context.cfg
    fps = float(cfg.fps)
    sr = cfg.audio_sample_rate
    frames = clip.frames
    start_s, end_s = clip.start / fps, (clip.start + len(frames)) / fps
    rejected = {"source": context.source, "start": start_s, "end": end_s}
    audio = context.audio.slice(start_s, end_s) if context.audio is not None else None
    view = ClipView(
        source=context.source, path=context.path, frames=frames, fps=fps, audio=audio,
        sample_rate=sr, start=start_s, end=end_s, floor_dbfs=context.floor,
        caption=context.caption.text, sidecar_pose=context.sidecars.pose, vad=cfg.vad,
    )  # fmt: skip
    if view.contrast < cfg.min_frame_contrast:
        return {
            **rejected,
            "reason": "blank",
            "detail": f"grey-level contrast below min_frame_contrast={cfg.min_frame_contrast}",
        }
    damage = context.damage.within(start_s, end_s)
    lost = max(damage["video_seconds_dropped"], damage["audio_seconds_dropped"])
    if lost > cfg.max_damaged_fraction * (end_s - start_s):
        return {
            **rejected,
            "reason": "damaged",
            "detail": f"{lost:.2f} s of {end_s - start_s:.2f} s lost to undecodable packets "
            f"(max_damaged_fraction={cfg.max_damaged_fraction}): {damage}",
        }
    found = annotate_clip(view, build_annotators(cfg.annotators), context.timings)
    text = str(found.fields.pop("caption", context.caption.text))
    if "caption" not in found.methods:
        found.methods["caption"] = context.caption.origin if text else "none"
    quality = condition_tiers(found.scores, text, cfg.thresholds)
    key = f"{source_id(context.source)}_c{clip_index:04d}"
    meta = {
        "key": key,
        "source": context.source,
        "clip_index": clip_index,
        "start": round(start_s, 6),
        "end": round(end_s, 6),
        "fps": float(fps),
        "num_frames": int(len(frames)),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "has_audio": audio is not None,
        "caption": text,
        "keypoints": found.fields.pop("keypoints", None),
        "keypoints_format": found.fields.pop("keypoints_format", None),
        **found.fields,
        "damage": damage,
        "quality": {
            **quality,
            "scores": found.scores,
            "methods": dict(sorted(found.methods.items())),
        },
    }
    with context.timings.stage("encode"):
        mp4 = encode_mp4(frames, fps, audio, sr, cfg.crf, clip.planes, colorspace)
    return Sample(key, context.spool.put(mp4) if context.spool else mp4, meta)


class Timings:
    """Seconds per stage of one source, summed over its clips."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def annotate_clip(clip: ClipView, annotators: list, timings: Timings | None = None) -> Findings:
    """Run the annotators in order; scores that are not finite numbers are left out."""
    found = Findings()
    for annotator in annotators:
        run_timed(annotator, clip, found)
    if timings is not None:
        for name, seconds in found.seconds.items():
            key = f"annotate/{name}"
            timings.seconds[key] = timings.seconds.get(key, 0.0) + seconds
    found.scores = {
        name: round(float(value), 6)
        for name, value in found.scores.items()
        if math.isfinite(float(value))
    }
    return found
