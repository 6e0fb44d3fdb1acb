"""Metrics sinks on the main rank: metrics.jsonl, W&B (offline by default), console."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from omni_train.trainer.checkpoint import write_json_atomic
from omni_train.trainer.config import LoggerConfig
from omni_train.trainer.progress import ProgressBar

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.json"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (they are redone after a resume)."""
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short by a kill
            if row.get("step", 0) <= last_step:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run dir, created once so restarts continue the same run."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["id"]
    run_id = uuid.uuid4().hex[:12]
    write_json_atomic(path, {"id": run_id})
    return run_id


class MetricsLogger:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        experiment: str,
        resolved_config: dict[str, Any],
        resume_step: int,
        max_steps: int,
        progress_bar: bool = True,
    ) -> None:
        self.cfg = cfg
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._start = time.monotonic()
        self._start_step = resume_step
        self.wandb_run: Any = None  # a WandbSink
        self.wandb_dir: Path | None = None
        self.progress = ProgressBar(max_steps, resume_step) if progress_bar else None
        if cfg.wandb.enabled:
            self._init_wandb(run_dir, experiment, resolved_config)

    def _init_wandb(self, run_dir: Path, experiment: str, config: dict[str, Any]) -> None:
        from omni_train.trainer.wandb_sink import WandbSink

        self.wandb_run = WandbSink(
            dict(
                project=self.cfg.wandb.project,
                entity=self.cfg.wandb.entity,
                group=self.cfg.wandb.group or experiment,
                name=experiment,
                tags=list(self.cfg.wandb.tags),
                id=wandb_run_id(run_dir),
                dir=str(run_dir),
                mode=self.cfg.wandb.mode,
                config=config,
            )
        )
        self.wandb_dir = self.wandb_run.dir

    def log_values(self, row: dict[str, Any]) -> None:
        """``row`` (with its ``step``) to metrics.jsonl and W&B only: no console line, so it
        needs none of the training keys (e.g. the step-0 validation before any update)."""
        self._file.write(json.dumps(row, sort_keys=True, allow_nan=True) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, row["step"])

    def log(self, row: dict[str, Any]) -> None:
        self.log_values(row)
        if self.progress is not None and self.progress.interactive:
            self.progress.update(row)
            return
        step = row["step"]
        if step % self.cfg.console_every == 0 or step == self.max_steps:
            log.info(self._console_line(row))

    def log_media(self, step: int, media: dict[str, Path]) -> None:
        """Videos (mp4 paths) to W&B; the files themselves stay in the run dir."""
        if self.wandb_run is None or not media:
            return
        import wandb

        self.wandb_run.log(
            {name: wandb.Video(str(path), format="mp4") for name, path in media.items()}, step
        )

    def _console_line(self, row: dict[str, Any]) -> str:
        elapsed = time.monotonic() - self._start
        done = row["step"] - self._start_step
        eta = elapsed / max(done, 1) * (self.max_steps - row["step"])
        loss = row["loss"]
        loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        return (
            f"step {row['step']}/{self.max_steps} stage {row['stage']} ({row['stage_name']}) "
            f"loss {loss_text} lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s "
            f"active t/r/a/p {row['active_text']}/{row['active_ref']}/{row['active_audio']}/"
            f"{row['active_pose']} of {row['batch_size']} eta {eta:.0f}s"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
