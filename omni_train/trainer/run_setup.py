"""What both trainers (denoiser and VAE) do the same way around their own model and losses:
prepare the run dir, build the DeepSpeed engine, stop for a preemption, and the
validate-then-run entry point. Saving and resuming is omni_train.trainer.checkpoint_manager.

Functions that log take the caller's logger, so log lines keep naming the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer.config import TrainerConfig
from omni_train.trainer.distributed import DistInfo, init_distributed
from omni_train.trainer.ds_config import deepspeed_config
from omni_train.trainer.lr_schedule import lr_lambda
from omni_train.trainer.preemption import PREEMPTED_MARKER, PreemptionError, SignalFlag
from omni_train.trainer.run_state import ResumePlan, plan_resume
from omni_train.validate import ConfigError


def run_validated(
    raw: DictConfig,
    cfg: Any,
    validate: Callable[..., None],
    run: Callable[[Any, dict[str, Any]], None],
    log: logging.Logger,
) -> None:
    """Validate cfg for this launch's world size (exit 2 on a bad config), print it and stop
    under check_only, else run(cfg, resolved)."""
    try:
        world_size = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
        validate(cfg, world_size=int(world_size))
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
    if cfg.check_only:
        print(OmegaConf.to_yaml(raw, resolve=True))
        return
    run(cfg, OmegaConf.to_container(raw, resolve=True))


def prepare_run_dir(run_dir: Path, ckpt_root: Path, is_main: bool, log: logging.Logger) -> None:
    """Create checkpoints/, drop unfinished (staging) checkpoints and a previous run's
    preemption marker; every rank waits for it."""
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.clear_staging(ckpt_root):
            log.warning("removed unfinished checkpoint %s", stale)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    dist.barrier()


@dataclass
class RunStart:
    """What a trainer knows once its process group and run dir are ready."""

    dist: DistInfo
    run_dir: Path
    ckpt_root: Path
    plan: ResumePlan | None
    ds_cfg: dict[str, Any]
    # Installed first: a stop signal from here on is recorded, not fatal (run() acts on it).
    signals: SignalFlag


def start_run(
    trainer_cfg: TrainerConfig,
    run_dir: str | Path,
    seed: int,
    batch_size: int,
    resolved: dict[str, Any],
    log: logging.Logger,
) -> RunStart:
    """Join the process group, prepare the run dir, find the checkpoint to resume and write
    this run's configs: the start every trainer shares."""
    signals = SignalFlag(trainer_cfg.preemption.signals)
    with signals.restored_on_error():
        dist_info = init_distributed(
            trainer_cfg.dist_backend, trainer_cfg.dist_timeout_minutes, trainer_cfg.cpu_shm_comm
        )
        run_dir = Path(run_dir)
        ckpt_root = run_dir / "checkpoints"
        prepare_run_dir(run_dir, ckpt_root, dist_info.is_main, log)
        plan = plan_resume(ckpt_root, seed)
        ds_cfg = engine_config(trainer_cfg, batch_size, dist_info, plan, run_dir, resolved)
    return RunStart(dist_info, run_dir, ckpt_root, plan, ds_cfg, signals)


def engine_config(
    trainer_cfg: TrainerConfig,
    batch_size: int,
    dist_info: DistInfo,
    plan: ResumePlan | None,
    run_dir: Path,
    resolved: dict[str, Any],
) -> dict[str, Any]:
    """The DeepSpeed config of this run; the main rank writes it and the resolved run config
    (config.yaml, deepspeed_config.json) into the run dir."""
    resized = plan is not None and plan.resized(dist_info.world_size)
    ds_cfg = deepspeed_config(
        trainer_cfg,
        batch_size,
        dist_info.world_size,
        cuda=dist_info.device.type == "cuda",
        load_universal=resized,
    )
    if dist_info.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2))
    return ds_cfg


def build_engine(
    model: torch.nn.Module,
    params: Iterable[Any],
    trainer_cfg: TrainerConfig,
    ds_cfg: dict[str, Any],
) -> tuple[Any, Any]:
    """(engine, lr scheduler): AdamW over params with the configured schedule, in DeepSpeed."""
    import deepspeed

    opt = trainer_cfg.optimizer
    optimizer = torch.optim.AdamW(
        params,
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt, trainer_cfg.max_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    return engine, scheduler


def write_preempted_marker(
    run_dir: Path, step: int, signal_name: str | None, code: int, **timings: float | None
) -> None:
    """Launchers that cannot see the exit code (torchrun reports any worker failure as 1)
    requeue on this marker instead. ``timings`` (seconds: the save, signal to saved) show the
    margin left before slurm's KillWait ends the job."""
    ckpt.write_json_atomic(
        run_dir / PREEMPTED_MARKER,
        {
            "step": step,
            "signal": signal_name,
            "exit_code": code,
            **{k: round(v, 3) for k, v in timings.items() if v is not None},
        },
    )


class Preemptible(Protocol):
    """What stop_for_preemption needs of a trainer."""

    run_dir: Path
    cfg: Any
    dist: DistInfo

    @property
    def global_step(self) -> int: ...

    def save(self, reason: str = ...) -> Path: ...


def stop_for_preemption(
    trainer: Preemptible, flag: SignalFlag, saved: Path | None, log: logging.Logger
) -> NoReturn:
    """Save (unless ``saved`` is this step's checkpoint, just written), leave the marker a
    launcher requeues on (main rank) with the save time, then raise PreemptionError with
    trainer.preemption.exit_code on every rank."""
    run_dir, step = trainer.run_dir, trainer.global_step
    code, is_main = trainer.cfg.trainer.preemption.exit_code, trainer.dist.is_main
    started = time.monotonic()
    saved = saved or trainer.save(reason="preempted")
    save_seconds = time.monotonic() - started
    since_signal = flag.seconds_since()
    if is_main:
        write_preempted_marker(
            run_dir,
            step,
            flag.received,
            code,
            save_seconds=save_seconds,
            seconds_since_signal=since_signal,
        )
        log.warning(
            "stopping on %s after step %d: saved %s in %.1f s%s; exiting with %d for a requeue "
            "(slurm's KillWait, 30 s by default, bounds signal-to-exit at a time limit)",
            flag.received or "a signal on another rank",
            step,
            saved,
            save_seconds,
            "" if since_signal is None else f", {since_signal:.1f} s after the signal",
            code,
        )
    raise PreemptionError(code)


def agree_across_ranks(nonfinite: bool, signalled: bool, device: torch.device) -> tuple[bool, bool]:
    """Whether any rank saw a non-finite loss / a stop signal (one tiny all-reduce)."""
    flags = torch.tensor([float(nonfinite), float(signalled)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0] > 0), bool(flags[1] > 0)
