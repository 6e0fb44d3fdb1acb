"""What an annotator sees (one clip) and what it leaves behind (scores, sample fields).

An annotator is any object with ``name`` and ``__call__(clip, found) -> None``; the shard
config lists them under ``annotators`` as Hydra ``_target_`` nodes and they run in that order,
so a later one (lip-sync) can read what an earlier one (face landmarks, audio) found.
Every annotator is deterministic: the same clip gives the same findings.

Views derived from the frames that several readers need (``ClipView.grey``, ``contrast``) are computed
once per clip, on first use, and shared; read them, never write to them.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_pipelines import measures
from data_pipelines.annotations import PoseTrack
from data_pipelines.config import VoiceActivityConfig

log = logging.getLogger(__name__)


class AnnotatorUnavailable(RuntimeError):
    """A configured annotator cannot run here (a package is missing, weights are absent).
    Stops the job: it is a setting to fix, not a bad input."""


@dataclass(frozen=True)
class ClipView:
    """One clip of one source, as every annotator sees it."""

    source: str  # posix path relative to input_dir
    path: Path  # the input file
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB at ``fps``
    fps: float
    audio: np.ndarray | None  # float32 mono at ``sample_rate`` covering the clip, or None
    sample_rate: int
    start: float  # seconds from the source's first frame
    end: float
    # Background level of the whole source track (dBFS), so a clip that is speech from end
    # to end is not judged against its own level; None without a track.
    floor_dbfs: float | None = None
    caption: str = ""  # from the captions manifest or the NAME.txt sidecar
    sidecar_pose: PoseTrack | None = None
    vad: VoiceActivityConfig = field(default_factory=VoiceActivityConfig)  # energy detector

    @cached_property
    def grey(self) -> np.ndarray:
        """``measures.grey(frames)``: (T, H, W) float32 luma, 0-255, read-only. Image quality,
        motion, optical flow and the mouth-darkness proxy all start from it."""
        grey = measures.grey(self.frames)
        grey.setflags(write=False)
        return grey

    @cached_property
    def contrast(self) -> float:
        """``measures.contrast(frames)``: the shard's blank-clip check and image quality."""
        return measures.contrast(self.frames, self.grey)


@dataclass
class Findings:
    """What the annotators found about one clip."""

    scores: dict[str, float] = field(default_factory=dict)  # raw scores, kept in the json
    fields: dict[str, Any] = field(default_factory=dict)  # top-level json fields
    methods: dict[str, str] = field(default_factory=dict)  # score family -> how measured
    # Per-frame signals handed from one annotator to the next, not stored.
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    # Wall-clock seconds per annotator name, filled by ``run_timed``; not stored.
    seconds: dict[str, float] = field(default_factory=dict)


class Annotator(Protocol):
    name: str

    def __call__(self, clip: ClipView, found: Findings) -> None: ...


def run_timed(annotator: Annotator, clip: ClipView, found: Findings) -> None:
    """``annotator(clip, found)``, adding its wall-clock time to ``found.seconds[name]``.
    A shared view (``clip.grey``) is charged to the first annotator that reads it."""
    started = time.perf_counter()
    try:
        annotator(clip, found)
    finally:
        elapsed = time.perf_counter() - started
        found.seconds[annotator.name] = found.seconds.get(annotator.name, 0.0) + elapsed


def optional_import(module: str, why: str, required: bool) -> Any | None:
    """``import module``; None when it is missing and not required, else a clear error."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if required:
            raise AnnotatorUnavailable(
                f"{why} needs the package providing '{module}': "
                "pip install -e '.[annotate]' (see data_pipelines/README.md), or choose "
                "another backend for this annotator"
            ) from err
        return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)
