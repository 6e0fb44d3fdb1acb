"""Self-reenactment evaluation of a checkpoint on held-out clips, as in the paper's tables.

For each clip the model gets one of the clip's own frames as the reference image and the
clip's own audio (plus its caption, and its keypoints for task=pose); the generated clip is
compared with the real one, and so are two baselines (the real clip, the reference frame
repeated). Writes OUT/eval.json (deterministic for a checkpoint and config), OUT/timings.json,
one side-by-side mp4 per clip in OUT/grid/, and an offline W&B run in OUT/wandb.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_train.config import TrainConfig
from omni_train.contracts import TASK_CONDITIONS
from omni_train.diffusion.cfg_parallel import CFGParallel, cfg_parallel_from_env, rank_device
from omni_train.diffusion.sampler import generate_long_video, segment_starts
from omni_train.evaluation.baselines import CANDIDATES, DESCRIPTIONS, candidate_videos
from omni_train.evaluation.clips import HeldOutClip, SkippedClip, held_out_clips, to_uint8
from omni_train.evaluation.config import EvaluateConfig
from omni_train.evaluation.grid import COLUMNS, grid_name, write_grid
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.scoring import (
    LoadedMetric,
    Outcome,
    call_metric,
    load_metrics,
    resolve,
    score_clip,
)
from omni_train.evaluation.summary import INTERVAL_METHOD, summarize

log = logging.getLogger("omni_train.evaluate")

EVAL_FILE = "eval.json"
TIMINGS_FILE = "timings.json"


class NothingToEvaluate(ValueError):
    """Every clip was skipped; the message lists why."""


@dataclass
class Target:
    """What is evaluated, known before any weights are loaded."""

    checkpoint: Path
    step: int | None
    run_dir: Path
    run_cfg: TrainConfig
    out: Path


@dataclass
class Timings:
    model_load_s: float = 0.0
    clips: list[dict] = field(default_factory=list)
    set_metrics_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0


def resolve_target(cfg: EvaluateConfig) -> Target:
    """Validate the config, find the checkpoint and read its run config (no weights)."""
    from omni_train.runs import read_run_config, resolve_checkpoint
    from omni_train.trainer.checkpoint import COMPLETE_MARKER

    cfg.validate()
    folder = resolve_checkpoint(cfg.checkpoint)
    run_cfg = read_run_config(folder, cfg.trust_checkpoint_code)
    step = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8")).get("step")
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    data = run_cfg.data
    if cfg.seconds > 0 and round(cfg.seconds * data.fps) < data.num_frames:
        raise ValueError(
            f"seconds={cfg.seconds:g} gives {round(cfg.seconds * data.fps)} frames at the run's "
            f"{data.fps:g} fps, less than one segment (data.num_frames={data.num_frames}): use "
            f"seconds >= {data.num_frames / data.fps:g}, or 0 for each clip's length"
        )
    out = Path(cfg.out) if cfg.out else run_dir / "eval"
    return Target(folder, step, run_dir, run_cfg, out)


def usable_clips(
    cfg: EvaluateConfig, run_cfg: TrainConfig, skipped: list[SkippedClip]
) -> Iterator[HeldOutClip]:
    """The first ``num_clips`` usable clips in key order, decoded one at a time; those skipped
    on the way are appended to ``skipped``. Raises NothingToEvaluate when none is usable."""
    data = run_cfg.data
    max_frames = round(cfg.seconds * data.fps) if cfg.seconds > 0 else 0
    count = 0
    for item in held_out_clips(cfg.shards, data, cfg.task, max_frames, cfg.reference_frame):
        if isinstance(item, SkippedClip):
            log.warning("skipping clip %s: %s", item.key, item.reason)
            skipped.append(item)
            continue
        count += 1
        yield item
        if count == cfg.num_clips:
            return
    if count == 0:
        reasons = "\n".join(f"  {s.key}: {s.reason}" for s in skipped)
        raise NothingToEvaluate(f"no clip of shards={cfg.shards!r} can be evaluated:\n{reasons}")


def generation_frames(cfg: EvaluateConfig, clip: HeldOutClip, fps: float) -> int:
    return round(cfg.seconds * fps) if cfg.seconds > 0 else clip.num_frames


def generated_segments(total: int, segment: int, motion: int) -> list[tuple[int, int]]:
    """Pixel frames [start, end) each segment contributes to the joined video."""
    starts = segment_starts(total, segment, motion)
    return [
        (start if i == 0 else start + motion, min(start + segment, total))
        for i, start in enumerate(starts)
    ]


def clip_seed(seed: int, key: str) -> int:
    """A generator seed per clip from its key, so a clip's noise does not depend on the others."""
    return (
        seed * 1_000_003 + int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little")
    ) % (2**63)


def generate_clip(
    run, cfg: EvaluateConfig, clip: HeldOutClip, diffusion, parallel: CFGParallel | None = None
) -> np.ndarray | None:
    """(G, H, W, 3) uint8: the model's self-reenactment of ``clip`` (None on the ranks after
    the first of ``parallel``, which only help generate it)."""
    from omni_train.media import AUDIO_RATE

    data = run.cfg.data
    total = generation_frames(cfg, clip, data.fps)
    audio = torch.zeros(round(total / data.fps * AUDIO_RATE))
    piece = clip.audio[: len(audio)]
    audio[: len(piece)] = piece
    ref = clip.frames[:, cfg.reference_frame][None]
    generator = torch.Generator().manual_seed(clip_seed(cfg.seed, clip.key))
    video = generate_long_video(
        run.denoiser,
        run.encoders,
        ref,
        audio,
        clip.caption,
        data.fps,
        total,
        data.num_frames,
        diffusion,
        generator,
        task=cfg.task,
        keypoints=clip.keypoints,
        pose_sigma=data.pose_sigma,
        parallel=parallel,
    )
    return None if video is None else to_uint8(video[0])


def _values_json(values: dict[str, MetricValue]) -> dict[str, dict]:
    return {key: value.to_json() for key, value in values.items()}


def evaluate(cfg: EvaluateConfig) -> Path | None:
    """Run the evaluation; returns the path of eval.json.

    Under torchrun (2 or 3 ranks) the guidance passes of each denoising step run on different
    ranks; rank 0 scores and writes everything, the others return None."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with cfg_parallel_from_env(device, cfg.sequence_parallel) as parallel:
        return _evaluate(cfg, device if parallel is None else rank_device(device), parallel)


def _evaluate(cfg: EvaluateConfig, device: str, parallel: CFGParallel | None) -> Path | None:
    from dataclasses import replace

    from omni_train.runs import load_run

    started = time.perf_counter()
    target = resolve_target(cfg)
    skipped: list[SkippedClip] = []
    clips = usable_clips(cfg, target.run_cfg, skipped)
    # The first usable clip is found (or every skip reported) before any weights are loaded.
    first = next(clips)
    scores = parallel is None or parallel.is_main
    clip_metrics = load_metrics(cfg.metrics, "clip") if scores else []
    set_metrics = load_metrics(cfg.metrics, "set") if scores else []
    timings = Timings()

    load_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = load_run(
        target.checkpoint,
        device=device,
        use_ema=cfg.use_ema,
        trust_checkpoint_code=cfg.trust_checkpoint_code,
    )
    timings.model_load_s = time.perf_counter() - load_start
    diffusion = run.cfg.diffusion
    if cfg.sampling_steps > 0:
        diffusion = replace(diffusion, sampling_steps=cfg.sampling_steps)
    data = run.cfg.data
    if not scores:
        for clip in itertools.chain([first], clips):
            with torch.no_grad():
                generate_clip(run, cfg, clip, diffusion, parallel)
        return None
    out = target.out
    out.mkdir(parents=True, exist_ok=True)

    outcome_rows: list[dict[str, dict[str, Outcome]]] = []
    clip_rows: list[dict] = []
    sets: dict[str, list[np.ndarray]] = {name: [] for name in CANDIDATES}
    for index, clip in enumerate(itertools.chain([first], clips)):
        log.info("clip %d (of at most %d): %s", index + 1, cfg.num_clips, clip.key)
        gen_start = time.perf_counter()
        with torch.no_grad():
            generated = generate_clip(run, cfg, clip, diffusion, parallel)
        generation_s = time.perf_counter() - gen_start
        real = to_uint8(clip.frames)
        reference = real[cfg.reference_frame]
        candidates = candidate_videos(generated, real, reference)
        segments = generated_segments(len(generated), data.num_frames, diffusion.motion_frames)
        inputs = ClipInputs(
            key=clip.key,
            real=real,
            reference=reference,
            fps=data.fps,
            audio=clip.audio.numpy() if clip.has_audio else None,
            segments=segments,
        )
        outcomes, metric_s = score_clip(clip_metrics, candidates, inputs)
        outcome_rows.append(outcomes)
        if set_metrics:
            for name, video in candidates.items():
                sets[name].append(video[: len(real)])
        grid = None
        if cfg.grid:
            grid = f"grid/{grid_name(index, clip.key)}"
            write_grid(
                out / grid, real, candidates["static_reference"], generated, data.fps, inputs.audio
            )
        clip_rows.append(
            {
                "key": clip.key,
                "caption": clip.caption,
                "quality": clip.quality,
                "has_audio": clip.has_audio,
                "frames_real": len(real),
                "frames_generated": len(generated),
                "seconds_real": len(real) / data.fps,
                "seconds_generated": len(generated) / data.fps,
                "segments": [list(s) for s in segments],
                "grid": grid,
            }
        )
        timings.clips.append(
            {
                "key": clip.key,
                "seconds_generated": len(generated) / data.fps,
                "seconds_real": len(real) / data.fps,
                "generation_s": generation_s,
                "metrics_s": metric_s,
            }
        )

    set_results = score_sets(set_metrics, sets, data.fps, timings)
    resolved = resolve(outcome_rows)
    for row, values in zip(clip_rows, resolved, strict=True):
        row["metrics"] = {name: _values_json(values[name]) for name in CANDIDATES}
    summary = summarize(resolved, CANDIDATES)
    for name in CANDIDATES:
        for key, value in set_results.get(name, {}).items():
            summary[name][key] = {
                "mean": value.value,
                "ci95": None,
                "ci95_reason": "one value over the whole set of clips",
                "n": len(clip_rows) if value.value is not None else 0,
                "method": value.method,
                "higher_is_better": value.higher_is_better,
                **({"reason": value.reason} if value.value is None else {}),
            }

    report = {
        "config": asdict(cfg),
        "checkpoint": {"path": str(target.checkpoint), "step": target.step},
        "task": cfg.task,
        "conditions": list(TASK_CONDITIONS[cfg.task]),
        "protocol": protocol(cfg, target.run_cfg, diffusion, clip_rows),
        "candidates": DESCRIPTIONS,
        "clips": clip_rows,
        "skipped": [{"key": s.key, "reason": s.reason} for s in skipped],
        "set_metrics": {name: _values_json(set_results.get(name, {})) for name in CANDIDATES},
        "summary": summary,
    }
    path = out / EVAL_FILE
    text = json.dumps(finite(report), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    timings.total_s = time.perf_counter() - started
    (out / TIMINGS_FILE).write_text(json.dumps(asdict(timings), indent=2) + "\n", "utf-8")
    if cfg.wandb:
        log_to_wandb(out, cfg, report, target)
    return path


def finite(obj: Any) -> Any:
    """``obj`` with non-finite floats (e.g. a NaN score in a shard's quality tags) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(value) for value in obj]
    return obj


def score_sets(
    metrics: list[LoadedMetric], sets: dict[str, list[np.ndarray]], fps: float, timings: Timings
) -> dict[str, dict[str, MetricValue]]:
    """Each set metric on each candidate set against the real set."""
    rows: dict[str, dict[str, Outcome]] = {name: {} for name in sets}
    for loaded in metrics:
        start = time.perf_counter()
        for name, videos in sets.items():
            rows[name][loaded.name] = call_metric(loaded, videos, sets["real"], fps)
        timings.set_metrics_s[loaded.name] = time.perf_counter() - start
    return resolve([rows])[0] if metrics else {}


def protocol(
    cfg: EvaluateConfig, run_cfg: TrainConfig, diffusion, clip_rows: list[dict]
) -> dict[str, Any]:
    """How the numbers were made, in words a reader of eval.json needs."""
    data = run_cfg.data
    longer = [c["key"] for c in clip_rows if c["frames_generated"] > c["frames_real"]]
    return {
        "kind": "self-reenactment",
        "reference": f"frame {cfg.reference_frame} of each clip (at the run's fps), from the "
        "clip's first frame",
        "driving": {
            "text": "the clip's caption (empty = the model's null text)",
            "audio": "the clip's own 16 kHz audio"
            + ("; silence past the clip's end" if longer else ""),
            "pose": "the clip's own keypoints as heatmaps"
            + ("; no joints past the clip's end" if longer else ""),
        },
        "generation_seconds": cfg.seconds if cfg.seconds > 0 else "each clip's length",
        "clips_generated_past_their_end": longer,
        "fidelity_scope": "clip metrics score the overlap with the real clip; long-video drift "
        "scores the whole generation",
        "set_metrics": "each candidate set against the set of real clips (overlap frames)",
        "resolution": list(data.resolution),
        "fps": data.fps,
        "segment_frames": data.num_frames,
        "motion_frames": diffusion.motion_frames,
        "sampling_steps": diffusion.sampling_steps,
        "guidance": {
            "text": [diffusion.cfg_text, diffusion.cfg_text_end],
            "audio": [diffusion.cfg_audio, diffusion.cfg_audio_end],
        },
        "weights": "ema" if cfg.use_ema else "model",
        "clip_order": "sorted by key; the first num_clips usable ones",
        "interval": INTERVAL_METHOD,
        "grid_columns": list(COLUMNS),
    }


def log_to_wandb(out: Path, cfg: EvaluateConfig, report: dict, target: Target) -> None:
    """An offline W&B run (unless WANDB_MODE says otherwise) with the rows and the summary."""
    import wandb

    run = wandb.init(
        project=cfg.wandb_project,
        dir=str(out),
        job_type="eval",
        name=f"eval-{target.run_dir.name}-step{target.step}",
        mode=os.environ.get("WANDB_MODE") or "offline",
        config=report["config"],
    )
    try:
        columns = ["clip", "candidate", "metric", "value", "reason", "method"]
        rows = [
            [clip["key"], candidate, key, value["value"], value["reason"], value["method"]]
            for clip in report["clips"]
            for candidate, values in clip["metrics"].items()
            for key, value in values.items()
        ]
        summary_columns = ["candidate", "metric", "mean", "ci95_lo", "ci95_hi", "n", "reason"]
        summary_rows = [
            [
                candidate,
                key,
                entry["mean"],
                *(entry["ci95"] or [None, None]),
                entry["n"],
                entry.get("reason"),
            ]
            for candidate, metrics in report["summary"].items()
            for key, entry in metrics.items()
        ]
        run.log(
            {
                "eval/clips": wandb.Table(columns=columns, data=rows),
                "eval/summary": wandb.Table(columns=summary_columns, data=summary_rows),
            }
        )
        for candidate, metrics in report["summary"].items():
            for key, entry in metrics.items():
                if entry["mean"] is not None:
                    run.summary[f"{candidate}/{key}"] = entry["mean"]
    finally:
        run.finish()
