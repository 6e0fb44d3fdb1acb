"""One input video -> its shard samples (mp4 + json per clip) or the reason it is left out.

``process_source`` is a pure function of the file, its sidecars and the config, so it gives
the same bytes every time and can run in any worker process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines import measures
from data_pipelines.annotations import Sidecars, read_sidecars
from data_pipelines.annotators import AnnotatorUnavailable, ClipView, Findings, build_annotators
from data_pipelines.clips import DecodedSource, clip_spans, decode_source, detect_cuts
from data_pipelines.config import ShardConfig
from data_pipelines.media import encode_mp4
from data_pipelines.probe import RejectedInput, probe_video
from data_pipelines.tags import condition_tiers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    key: str
    mp4: bytes
    meta: dict

    def members(self) -> dict[str, bytes]:
        """Tar members by extension, in the order they are written."""
        payload = json.dumps(self.meta, ensure_ascii=False, separators=(",", ":"))
        return {"json": payload.encode("utf-8"), "mp4": self.mp4}

    @property
    def size(self) -> int:
        return sum(len(payload) for payload in self.members().values())


@dataclass(frozen=True)
class SourceResult:
    source: str
    samples: list[Sample] = field(default_factory=list)
    # Rows for rejects.jsonl: the whole input, or single clips of it.
    rejects: list[dict] = field(default_factory=list)


def source_id(source: str) -> str:
    """First 16 hex chars of the sha1 of the input's posix path relative to input_dir."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CaptionChoice:
    text: str
    origin: str  # "manifest", "sidecar" or "none"


def process_source(
    path: Path, source: str, cfg: ShardConfig, caption: str | None = None
) -> SourceResult:
    """Probe, decode, split, annotate, tag and encode one input. Never raises for a bad
    input (it becomes a reject); raises AnnotatorUnavailable, a setting to fix.
    ``caption`` comes from the captions manifest and wins over a NAME.txt sidecar."""
    try:
        return _process(path, source, cfg, caption)
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


def _process(path: Path, source: str, cfg: ShardConfig, caption: str | None) -> SourceResult:
    probe_video(path, cfg.min_clip_seconds)
    decoded = decode_source(path, cfg.fps, cfg.max_side, cfg.audio_sample_rate)
    clip_frames = max(1, round(cfg.clip_seconds * cfg.fps))
    min_frames = max(1, math.ceil(cfg.min_clip_seconds * cfg.fps - 1e-6))
    if len(decoded.frames) < min_frames:
        raise RejectedInput(
            "too_short",
            f"{len(decoded.frames)} frames at {cfg.fps} fps, fewer than the {min_frames} of "
            f"min_clip_seconds={cfg.min_clip_seconds}",
        )
    cuts = detect_cuts(decoded.frames, cfg.shot_threshold)
    spans = clip_spans(len(decoded.frames), cuts, clip_frames, min_frames)
    if not spans:
        raise RejectedInput(
            "no_usable_clip",
            f"{len(cuts) + 1} shots, none at least min_clip_seconds={cfg.min_clip_seconds} long",
        )
    sidecars = read_sidecars(path)
    chosen = CaptionChoice(sidecars.caption, "sidecar" if sidecars.caption else "none")
    if caption is not None:
        chosen = CaptionChoice(" ".join(caption.split()), "manifest")
    floor = None
    if decoded.audio is not None:
        floor = measures.noise_floor_dbfs(decoded.audio, decoded.sample_rate, cfg.vad)
    result = SourceResult(source)
    for clip_index, (start, end) in enumerate(spans):
        sample = _make_sample(
            decoded, sidecars, chosen, source, path, clip_index, start, end, floor, cfg
        )
        if isinstance(sample, dict):
            result.rejects.append(sample)
        else:
            result.samples.append(sample)
    if not result.samples:
        raise RejectedInput(
            "no_usable_clip",
            f"all {len(spans)} clips were left out: "
            + ", ".join(sorted({r["reason"] for r in result.rejects})),
        )
    return result


def _make_sample(
    decoded: DecodedSource,
    sidecars: Sidecars,
    caption: CaptionChoice,
    source: str,
    path: Path,
    clip_index: int,
    start: int,
    end: int,
    floor: float | None,
    cfg: ShardConfig,
) -> Sample | dict:
    fps, sr = decoded.fps, decoded.sample_rate
    frames = decoded.frames[start:end]
    start_s, end_s = start / fps, end / fps
    if measures.contrast(frames) < cfg.min_frame_contrast:
        return {
            "source": source,
            "reason": "blank",
            "start": start_s,
            "end": end_s,
            "detail": f"grey-level contrast below min_frame_contrast={cfg.min_frame_contrast}",
        }
    audio = None
    if decoded.audio is not None:
        audio = decoded.audio[round(start_s * sr) : round(end_s * sr)]
        audio = np.pad(audio, (0, max(0, round(end_s * sr) - round(start_s * sr) - len(audio))))
    clip = ClipView(
        source=source, path=path, frames=frames, fps=fps, audio=audio, sample_rate=sr,
        start=start_s, end=end_s, floor_dbfs=floor, caption=caption.text,
        sidecar_pose=sidecars.pose, vad=cfg.vad,
    )  # fmt: skip
    found = annotate_clip(clip, build_annotators(cfg.annotators))
    text = str(found.fields.pop("caption", caption.text))
    if "caption" not in found.methods:
        found.methods["caption"] = caption.origin if text else "none"
    quality = condition_tiers(found.scores, text, cfg.thresholds)
    key = f"{source_id(source)}_c{clip_index:04d}"
    meta = {
        "key": key,
        "source": source,
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
        "quality": {
            **quality,
            "scores": found.scores,
            "methods": dict(sorted(found.methods.items())),
        },
    }
    mp4 = encode_mp4(frames, fps, audio, sr, cfg.crf)
    return Sample(key, mp4, meta)


def annotate_clip(clip: ClipView, annotators: list) -> Findings:
    """Run the annotators in order; scores that are not finite numbers are left out."""
    found = Findings()
    for annotator in annotators:
        annotator(clip, found)
    found.scores = {
        name: round(float(value), 6)
        for name, value in found.scores.items()
        if math.isfinite(float(value))
    }
    return found
