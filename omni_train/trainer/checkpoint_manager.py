"""Saving and resuming a run: every piece of its state, written into one atomic folder per step.

A checkpoint, ``run_dir/checkpoints/step_NNNNNNNN/``, holds

  DeepSpeed's files          weights, optimizer and lr schedule (every rank its own shards)
  loader_rankRRRRR.json      rank R's data loader position (``LoaderPosition``)
  rng_rankRRRRR.json         rank R's global random streams (``RNGState``)
  curriculum_counts.json     the curriculum's stage-so-far counts (``CurriculumMeter``)
  ema.safetensors            the full weights with the EMA in place of the trainable ones
                             (with a frozen base: the trainable ones' EMA only)
  the trainer's exports      model.safetensors and frozen.safetensors, or vae.safetensors
  config.yaml                the run's resolved config
  complete.json              the counters (``TrainState``) and facts of the save; written
                             last, it marks the folder complete (omni_train.trainer.checkpoint)

Each state object follows torch's ``Stateful`` protocol (``state_dict`` / ``load_state_dict``);
``CheckpointManager`` decides where each one lives. The per-rank files belong to the world
size that wrote them: a resume on another one re-partitions the engine through a universal
checkpoint (omni_train.trainer.universal) and leaves the data position to the trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.stateful import Stateful

from omni_train.models.weights import load_state_dict_file, save_safetensors
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer.distributed import DistInfo
from omni_train.trainer.ema import EMA_FILE, ShardedEMA
from omni_train.trainer.metrics import wandb_run_id
from omni_train.trainer.run_state import ResumePlan, RNGState, TrainState, read_json
from omni_train.trainer.universal import clear_universal, convert_to_universal, universal_root
from omni_train.trainer.weights import consolidated_state

if TYPE_CHECKING:
    from omni_train.trainer.config import TrainerConfig
    from omni_train.trainer.run_setup import RunStart

# Stage-so-far curriculum counts, so per-stage ratios survive a restart.
CURRICULUM_FILE = "curriculum_counts.json"
LOADER = "loader"
RNG = "rng"

# Writes the trainer's own weight files into a staging folder, given the full weights.
Export = Callable[[Path, dict[str, torch.Tensor]], None]


def rank_file(name: str, rank: int) -> str:
    """The file of one rank's ``name`` state, e.g. loader_rank00001.json."""
    return f"{name}_rank{rank:05d}.json"


class LoaderPosition:
    """The data loader's position as checkpoint state.

    A loader takes a saved position only when it is built (omni_train.data.stream
    ``build_loader``), so ``load_state_dict`` keeps the position for ``build``; without one
    the loader starts at the beginning. ``state_dict`` is the built loader's position.
    """

    def __init__(self, build: Callable[[dict[str, Any] | None], Any]) -> None:
        self._build = build
        self._saved: dict[str, Any] | None = None
        self.loader: Any = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loader is not None:
            raise RuntimeError("the data loader is built: load its position before build()")
        self._saved = state

    def build(self) -> Any:
        self.loader = self._build(self._saved)
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        if self.loader is None:
            raise RuntimeError("the data loader is not built yet: call build() first")
        return self.loader.state_dict()


def stage_checkpoint(
    engine: Any, ckpt_root: Path, step: int, is_main: bool, trained_only: bool = False
) -> Path:
    """Write the engine state into a new staging dir (every rank its own shards); with
    ``trained_only``, without the frozen parameters."""
    staging = ckpt.staging_dir(ckpt_root, step)
    if is_main:
        ckpt.clear_staging(ckpt_root)
        staging.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(
        str(ckpt_root),
        tag=staging.name,
        save_latest=False,
        exclude_frozen_parameters=trained_only,
    )
    return staging


def load_resumed(
    engine: Any,
    plan: ResumePlan,
    resized: bool,
    dist_info: DistInfo,
    ckpt_root: Path,
    run_dir: Path,
    log: logging.Logger,
    trained_only: bool = False,
) -> None:
    """Load weights, optimizer and lr schedule of plan.checkpoint; when the world size changed,
    through a universal checkpoint converted by the main rank. A ``trained_only`` checkpoint
    lacks the frozen parameters, which keep the values the model was built with."""
    load_dir = ckpt_root
    if resized:
        if dist_info.is_main:
            convert_to_universal(plan.checkpoint, run_dir)
        dist.barrier()
        load_dir = universal_root(run_dir)
    with ckpt.weights_only_loads():
        loaded, _ = engine.load_checkpoint(
            str(load_dir),
            tag=plan.checkpoint.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not trained_only,
        )
    if loaded is None:  # DeepSpeed found nothing to load: training on would start from scratch
        raise RuntimeError(
            f"DeepSpeed loaded nothing from {load_dir / plan.checkpoint.name} (resuming "
            f"{plan.checkpoint}): its model/optimizer files are missing or unreadable. Restore "
            f"them, or move {plan.checkpoint} out of {ckpt_root} to resume from an older "
            "checkpoint"
        )
    log.info("resumed from %s (step %d)", plan.checkpoint, plan.step)


class CheckpointManager:
    """Saves the run's state as a checkpoint folder and loads it back (see the module doc).

    ``state`` (the counters), ``data`` (the loader position) and the optional ``curriculum``
    meter and ``ema`` are the objects it saves and loads, besides the engine and this
    process's random streams. ``trained_only``: the engine's frozen parameters (a frozen
    base) are neither saved nor loaded, and the exported weights are the trainable ones.
    Every rank must call ``save`` and ``load``.
    """

    def __init__(
        self,
        engine: Any,
        start: RunStart,
        trainer_cfg: TrainerConfig,
        resolved: dict[str, Any],
        wandb_enabled: bool,
        state: TrainState,
        data: LoaderPosition,
        log: logging.Logger,
        curriculum: Stateful | None = None,
        ema: ShardedEMA | None = None,
        trained_only: bool = False,
    ) -> None:
        self.engine = engine
        self.trained_only = trained_only
        self.dist, self.run_dir, self.ckpt_root = start.dist, start.run_dir, start.ckpt_root
        self.trainer_cfg = trainer_cfg
        self.resolved = resolved
        self.wandb_enabled = wandb_enabled
        self.state = state
        self.log = log
        self.curriculum = curriculum
        self.ema = ema
        self.rank_states: dict[str, Stateful] = {LOADER: data, RNG: RNGState()}

    # ----------------------------------------------------------------------------- save
    def save(self, reason: str, export: Export, **facts: Any) -> Path:
        """Checkpoint the current step and publish it; returns its folder.

        ``export(staging, weights)`` writes the trainer's weight files (main rank, the full
        weights); ``facts`` join the counters and ``reason`` in complete.json.
        """
        is_main = self.dist.is_main
        step = self.state.step
        staging = stage_checkpoint(self.engine, self.ckpt_root, step, is_main, self.trained_only)
        for name, state in self.rank_states.items():
            ckpt.write_json_atomic(staging / rank_file(name, self.dist.rank), state.state_dict())
        weights = consolidated_state(self.engine, is_main, self.trained_only)
        average = self.ema.state_dict() if self.ema is not None else None
        if is_main:
            export(staging, weights)
            if average is not None:
                save_safetensors({**weights, **average}, staging / EMA_FILE)
        dist.barrier()  # every rank's files are in staging before the main rank publishes it
        final = staging.with_name(ckpt.checkpoint_name(step))
        if is_main:
            if self.curriculum is not None:
                ckpt.write_json_atomic(staging / CURRICULUM_FILE, self.curriculum.state_dict())
            final = self._publish(staging, self._meta(reason, facts))
        dist.barrier()
        return final

    def _meta(self, reason: str, facts: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **self.state.state_dict(),
            "world_size": self.dist.world_size,
            "zero_stage": self.trainer_cfg.zero_stage,
            "reason": reason,
            **facts,
            "time": time.time(),
        }

    def _publish(self, staging: Path, meta: dict[str, Any]) -> Path:
        """Main rank: add config.yaml, publish staging under its final name, prune old
        checkpoints and the universal copy; returns the published checkpoint."""
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(self.resolved))
        if self.wandb_enabled:
            meta["wandb_run_id"] = wandb_run_id(self.run_dir)
        final = ckpt.publish(staging, meta)
        for old in ckpt.prune(staging.parent, self.trainer_cfg.keep_last):
            self.log.info("removed old checkpoint %s", old)
        clear_universal(self.run_dir)
        self.log.info("saved checkpoint %s", final)
        return final

    # ----------------------------------------------------------------------------- load
    def load(self, plan: ResumePlan) -> bool:
        """Resume everything plan.checkpoint holds; returns whether another world size saved
        it. Then the per-rank files (data position, random streams) are not loaded: they
        describe the old ranks, and the caller decides how the data continues."""
        resized = plan.resized(self.dist.world_size)
        load_resumed(
            self.engine,
            plan,
            resized,
            self.dist,
            self.ckpt_root,
            self.run_dir,
            self.log,
            self.trained_only,
        )
        self.state.load_state_dict(plan.meta)
        if not resized:
            self._load_rank_states(plan.checkpoint)
        if self.ema is not None:
            if (plan.checkpoint / EMA_FILE).is_file():
                self.ema.load_state_dict(load_state_dict_file(plan.checkpoint / EMA_FILE))
            else:  # saved without an EMA: the average starts at the resumed weights
                self.ema.restart()
        if self.curriculum is not None and (plan.checkpoint / CURRICULUM_FILE).is_file():
            self.curriculum.load_state_dict(read_json(plan.checkpoint / CURRICULUM_FILE))
        return resized

    def _load_rank_states(self, checkpoint: Path) -> None:
        rng = checkpoint / rank_file(RNG, self.dist.rank)
        if rng.is_file():  # optional: only other draws than the losses' depend on it
            self.rank_states[RNG].load_state_dict(read_json(rng))
        self.rank_states[LOADER].load_state_dict(
            read_json(checkpoint / rank_file(LOADER, self.dist.rank))
        )
