"""The Trainer owns the loop: build, resume, step, guard, log, save, stop."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from omni_train.config import TrainConfig
from omni_train.contracts import latent_frames
from omni_train.curriculum import (
    CurriculumMeter,
    condition_masks,
    motion_latents_for_step,
    stage_at,
)
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.stream import build_loader
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_frozen_encoders
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer import throughput
from omni_train.trainer.config import VAL_TASKS
from omni_train.trainer.ema import EMA_FILE, ShardedEMA
from omni_train.trainer.metrics import MetricsLogger
from omni_train.trainer.preemption import SignalFlag
from omni_train.trainer.profiling import StepProfiler
from omni_train.trainer.run_setup import (
    agree_across_ranks,
    build_engine,
    load_resumed,
    publish_checkpoint,
    restore_rank_state,
    stage_checkpoint,
    start_run,
    stop_for_preemption,
    write_rank_state,
)
from omni_train.trainer.run_state import (
    ResumePlan,
    capture_rng,
    read_json,
    resized_data_seed,
)
from omni_train.trainer.step import StepResult, compute_loss, step_seed
from omni_train.trainer.weights import consolidated_state, export_weights, frozen_is_random

# Stage-so-far curriculum counts, so per-stage ratios survive a restart.
CURRICULUM_FILE = "curriculum_counts.json"

log = logging.getLogger(__name__)

# Reason of trainer.save_at_start's step-0 checkpoint, which pruning keeps.
START_REASON = "start"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss; the last good state was saved."""


class DataOrderError(RuntimeError):
    """A resume on another world size cannot continue the saved data order."""


def _param_groups(denoiser: torch.nn.Module, lr: float, new_scale: float) -> list[dict]:
    new, backbone = [], []
    for name, param in denoiser.named_parameters():
        if param.requires_grad:
            (new if name.startswith(denoiser.new_module_prefixes) else backbone).append(param)
    groups = [{"params": backbone, "lr": lr, "name": "backbone"}]
    if new:
        groups.append({"params": new, "lr": lr * new_scale, "name": "new_modules"})
    return groups


class Trainer:
    def __init__(self, cfg: TrainConfig, resolved: dict[str, Any]) -> None:
        self.cfg = cfg
        tcfg = cfg.trainer
        self.resolved = resolved
        start = start_run(tcfg, cfg.run_dir, cfg.seed, cfg.data.batch_size, resolved, log)
        self.signals = start.signals
        with self.signals.restored_on_error():
            self._build(start)

    def _build(self, start) -> None:
        cfg, tcfg, resolved = self.cfg, self.cfg.trainer, self.resolved
        self.dist, self.run_dir, self.ckpt_root = start.dist, start.run_dir, start.ckpt_root
        self.device = self.dist.device
        self.plan, ds_cfg = start.plan, start.ds_cfg

        # Same seed on every rank: random-init encoders and the denoiser agree everywhere.
        torch.manual_seed(cfg.seed)
        self.encoders = build_frozen_encoders(cfg.model).to(self.device).eval()
        self.encoders.requires_grad_(False)
        denoiser = build_denoiser(cfg.model)
        opt_cfg = tcfg.optimizer
        params = _param_groups(denoiser, opt_cfg.lr, opt_cfg.new_module_lr_scale)
        self.engine, self.scheduler = build_engine(denoiser, params, tcfg, ds_cfg)

        self.global_step = 0
        self.data_seed = cfg.seed
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        loader_state = self._resume(self.plan) if self.plan is not None else None
        self.ema = None
        if tcfg.ema.enabled:
            self.ema = ShardedEMA(
                self.engine.module, tcfg.ema, self.dist.rank, self.dist.world_size
            )
            if self.plan is not None and (self.plan.checkpoint / EMA_FILE).is_file():
                from omni_train.models.weights import load_state_dict_file

                self.ema.load_full(load_state_dict_file(self.plan.checkpoint / EMA_FILE))
        self.loader = build_loader(
            cfg.data,
            self.dist.rank,
            self.dist.world_size,
            self.data_seed,
            loader_state,
            curriculum=cfg.curriculum,
            grad_accum=tcfg.grad_accum,
        )
        meter_state = None
        if self.plan is not None and (self.plan.checkpoint / CURRICULUM_FILE).is_file():
            meter_state = json.loads((self.plan.checkpoint / CURRICULUM_FILE).read_text())
        self.curriculum_meter = CurriculumMeter(cfg.curriculum, meter_state)
        self.tokens_per_sample = throughput.tokens_per_sample(
            cfg.model, cfg.data.resolution, cfg.data.num_frames
        )
        self.peak_tflops = throughput.detect_peak_tflops(tcfg.peak_tflops, tcfg.precision)
        self.profiler = StepProfiler(tcfg.profiler, self.run_dir / "profile", self.dist.rank)
        self.validator = None
        if tcfg.validation.every > 0:
            from omni_train.trainer.validation import Validator

            self.validator = Validator(cfg, self.run_dir, self.dist, self.encoders)
        self.val_loss = None
        if tcfg.val_every > 0 or tcfg.val_at_start:
            from omni_train.trainer.val_loss import ValLoss

            self.val_loss = ValLoss(
                tcfg.val_loss,
                cfg.data,
                cfg.diffusion,
                self.encoders,
                self.dist.rank,
                self.dist.world_size,
                self.device,
            )
            self.val_loss.prepare()  # no held-out clip, or a bad one, fails now, not later
        self.metrics = None
        if self.dist.is_main:
            self.metrics = MetricsLogger(
                cfg.logger,
                self.run_dir,
                cfg.experiment,
                resolved,
                self.global_step,
                tcfg.max_steps,
                progress_bar=tcfg.progress_bar,
            )

    # ----------------------------------------------------------------------------- resume
    def _resume(self, plan: ResumePlan) -> dict | None:
        world_size = self.dist.world_size
        resized = plan.resized(world_size)
        if resized:
            log.warning(
                "%s was saved by %d ranks; this run has %d: resuming from a universal "
                "checkpoint (weights, optimizer state and data position re-partitioned)",
                plan.checkpoint,
                plan.saved_world_size,
                world_size,
            )
        load_resumed(self.engine, plan, resized, self.dist, self.ckpt_root, self.run_dir, log)
        self.global_step = plan.step
        self.nonfinite_total = int(plan.meta.get("nonfinite_skipped", 0))
        self.data_seed = plan.data_seed
        if resized:
            return self._resized_loader_state(plan)
        return restore_rank_state(plan, self.dist.rank)

    def _resized_loader_state(self, plan: ResumePlan) -> dict | None:
        """Deal the interrupted epoch's remaining samples out to the new ranks. Saved states
        that cannot be re-dealt stop the run (samples would be skipped or repeated) unless
        trainer.allow_new_data_order accepts a fresh, reproducible order."""
        saved = [read_json(p) for p in sorted(plan.checkpoint.glob("loader_rank*.json"))]
        try:
            return elastic_loader_state(saved, self.dist.rank, self.dist.world_size, self.cfg.data)
        except ValueError as err:
            if not self.cfg.trainer.allow_new_data_order:
                raise DataOrderError(
                    f"the data position of {plan.checkpoint} (saved by {plan.saved_world_size} "
                    f"rank(s)) cannot be carried over to {self.dist.world_size} rank(s): {err}. "
                    "Starting a new data order would skip or repeat samples of the interrupted "
                    "epoch. Resume with the saved world size and data settings, or set "
                    "trainer.allow_new_data_order=true to accept a new (reproducible) order"
                ) from err
            log.warning(
                "loader position not carried over (%s): a new data order starts "
                "(trainer.allow_new_data_order=true)",
                err,
            )
            self.data_seed = resized_data_seed(plan.data_seed, plan.step)
            return None

    # ----------------------------------------------------------------------------- loop
    def run(self) -> None:
        tcfg = self.cfg.trainer
        batches = iter(self.loader)
        flag = self.signals
        try:
            if self.plan is None:  # a fresh start; a resumed run did this before its save
                self._before_first_update()
            while self.global_step < tcfg.max_steps:
                started = time.perf_counter()
                with self.profiler.step(self.global_step):
                    result, data_wait, finite, stop = self._train_step(batches, flag)
                self.global_step += 1
                elapsed = time.perf_counter() - started
                self._after_update(finite)
                val = None
                if tcfg.val_every > 0 and self.global_step % tcfg.val_every == 0:
                    val = self._val_metrics()
                if (
                    self.global_step % tcfg.log_every == 0
                    or self.global_step == tcfg.max_steps
                    or val is not None
                ):
                    self._log(result, elapsed, data_wait, finite, val)
                if self.nonfinite_in_row >= tcfg.nonfinite.max_consecutive:
                    self._stop_nonfinite()
                if stop:
                    self._stop_preempted(flag)
                saved = None
                if self.global_step % tcfg.save_every == 0 or self.global_step == tcfg.max_steps:
                    saved = self.save()
                validated = (
                    self.validator is not None and self.global_step % tcfg.validation.every == 0
                )
                if validated:
                    self._validate()
                # A signal during the validation loss, a save or validation sampling stops
                # now, not one step later: that work may have used much of slurm's KillWait.
                if (val is not None or saved or validated) and self._agree(False, flag.raised)[1]:
                    self._stop_preempted(flag, saved)
        finally:
            self.profiler.close()
            if self.metrics is not None:
                self.metrics.close()
            # Last: a launcher's own handler (submitit's requeue) may run here and exit.
            flag.restore()
        if self.dist.is_main:
            log.info("training finished at step %d; run dir %s", self.global_step, self.run_dir)

    def _before_first_update(self) -> None:
        tcfg = self.cfg.trainer
        if self.val_loss is not None and tcfg.val_at_start:
            self._log_before_training(self._val_metrics())
        if tcfg.save_at_start:
            self.save(reason=START_REASON)

    def _after_update(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_row = 0
            if self.ema is not None:
                self.ema.update(self.global_step)
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        # The skipped update did not step the engine's schedule; keep lr tied to the step.
        self.scheduler.step()
        if self.dist.is_main:
            log.warning(
                "step %d: non-finite loss, update skipped (%d in a row, %d in total)",
                self.global_step,
                self.nonfinite_in_row,
                self.nonfinite_total,
            )

    def _stop_nonfinite(self) -> None:
        saved = self.save(reason="nonfinite")
        raise NonFiniteLossError(
            f"{self.nonfinite_in_row} consecutive steps had a NaN/Inf loss (up to step "
            f"{self.global_step}; trainer.nonfinite.max_consecutive="
            f"{self.cfg.trainer.nonfinite.max_consecutive}). No update was applied in those "
            f"steps, so {saved} holds the last good weights. Lower trainer.optimizer.lr or "
            "raise trainer.grad_clip and restart the same command to resume from it (the data "
            "loader continues after the failing batches), or delete it to redo them"
        )

    def _stop_preempted(self, flag: SignalFlag, saved: Path | None = None) -> None:
        stop_for_preemption(self, flag, saved, log)

    def _agree(self, nonfinite: bool, signalled: bool) -> tuple[bool, bool]:
        return agree_across_ranks(nonfinite, signalled, self.device)

    def _train_step(self, batches, flag: SignalFlag) -> tuple[StepResult, float, bool, bool]:
        cfg = self.cfg
        step_index = self.global_step  # steps completed before this one
        n_motion = motion_latents_for_step(
            cfg.curriculum, step_index, cfg.seed, latent_frames(cfg.diffusion.motion_frames)
        )
        results, data_wait, finite, stop = [], 0.0, True, False
        for micro in range(cfg.trainer.grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited
            if not finite:
                continue  # the step is skipped; still consume its batches (exact resume)
            masks = condition_masks(
                cfg.curriculum, step_index, batch["keys"], batch["quality"], cfg.seed
            )
            self.curriculum_meter.add(step_index, masks, batch["quality"], batch["has_audio"])
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(cfg.seed, step_index, self.dist.rank, micro))
            result = compute_loss(
                self.engine,
                self.encoders,
                batch,
                masks,
                n_motion,
                cfg.diffusion,
                generator,
                self.device,
                cfg.data.pose_sigma,
            )
            bad, stop = self._agree(not bool(torch.isfinite(result.loss)), flag.raised)
            results.append(result.detach())
            if bad:
                finite = False
                self._discard_accumulated(micro)
                continue
            self.engine.backward(result.loss)
            self.engine.step()
        return StepResult.merge(results), data_wait, finite, stop

    def _discard_accumulated(self, micro: int) -> None:
        """Drop gradients of earlier micro-batches of a skipped step and realign the engine's
        accumulation counter so the next step starts on a fresh boundary."""
        if micro == 0:
            return
        self.engine.zero_grad()
        # ZeRO-2/3 keep reduced gradient partitions of earlier micro-batches in flat buffers
        # that zero_grad() leaves alone (they are normally consumed by the optimizer step).
        optimizer = self.engine.optimizer
        for name in ("grads_in_partition", "grad_partitions_flat_buffer"):
            buffer = getattr(optimizer, name, None)
            if torch.is_tensor(buffer):
                buffer.zero_()
        for name in ("all_grad_tensors", "averaged_gradients"):
            per_group = getattr(optimizer, name, None)
            if isinstance(per_group, dict):
                for group in per_group:
                    per_group[group] = None
        self.engine.micro_steps += self.cfg.trainer.grad_accum - micro

    def _log(
        self,
        result: StepResult,
        elapsed: float,
        data_wait: float,
        finite: bool,
        val: dict[str, float] | None = None,
    ) -> None:
        stage_index, stage = stage_at(self.cfg.curriculum, self.global_step - 1)
        data = self.cfg.data
        # The model FLOPs and text positions that ran on this rank, summed with the totals.
        work = throughput.flops_of_samples(
            self.cfg.model, data.resolution, data.num_frames, result.text_tokens
        )
        ran = torch.tensor([work, sum(result.text_tokens)], dtype=torch.float64)
        totals = torch.cat([result.totals(self.device), ran.to(self.device)])
        dist.all_reduce(totals)
        *summed, step_flops, step_text_tokens = totals.tolist()
        peaks = throughput.peak_memory_gb(self.device)
        peak_values = torch.tensor(list(peaks.values()), device=self.device)
        dist.all_reduce(peak_values, op=dist.ReduceOp.MAX)
        row = result.row_from_totals(summed)
        counts = torch.tensor(
            self.curriculum_meter.vector(), dtype=torch.float64, device=self.device
        )
        dist.all_reduce(counts)
        row.update(self.curriculum_meter.flush(self.global_step - 1, counts.tolist()))
        grad_norm = self.engine.get_global_grad_norm() if finite else None
        samples_per_s = row["batch_size"] / max(elapsed, 1e-9)
        flops_per_sample = step_flops / max(row["batch_size"], 1)
        lrs = self.scheduler.get_last_lr()
        row.update(
            step=self.global_step,
            stage=stage_index + 1,
            stage_name=stage.name,
            lr=lrs[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            samples_per_s=samples_per_s,
            tokens_per_s=samples_per_s * self.tokens_per_sample,
            text_tokens=step_text_tokens / max(row["batch_size"], 1),
            tflops_per_s=samples_per_s * flops_per_sample / 1e12,
            step_time_s=elapsed,
            data_wait_s=data_wait,
            data_wait_frac=data_wait / max(elapsed, 1e-9),
            num_motion_latents=result.num_motion_latents,
            nonfinite_skipped=self.nonfinite_total,
            update_skipped=int(not finite),
        )
        if len(lrs) > 1:
            row["lr_new_modules"] = lrs[1]
        row.update(dict(zip(peaks, peak_values.tolist(), strict=True)))
        if self.peak_tflops:
            row["peak_tflops"] = self.peak_tflops
            row["mfu"] = throughput.mfu(
                flops_per_sample, samples_per_s, self.dist.world_size, self.peak_tflops
            )
        if val:
            row.update(val)
        if self.metrics is not None:
            self.metrics.log(row)

    # ----------------------------------------------------------------------------- save
    def save(self, reason: str = "cadence") -> Path:
        step = self.global_step
        staging = stage_checkpoint(self.engine, self.ckpt_root, step, self.dist.is_main)
        write_rank_state(staging, self.dist.rank, self.loader.state_dict(), capture_rng())
        state = consolidated_state(self.engine, self.dist.is_main)
        ema_state = self.ema.gather(self.dist.is_main) if self.ema is not None else None
        if self.dist.is_main:
            export_weights(self.engine, self.encoders, self.cfg.model, staging, True, state=state)
            if ema_state is not None:
                from omni_train.models.weights import save_safetensors

                save_safetensors({**state, **ema_state}, staging / EMA_FILE)
        dist.barrier()
        final = staging.with_name(ckpt.checkpoint_name(step))
        if self.dist.is_main:
            ckpt.write_json_atomic(staging / CURRICULUM_FILE, self.curriculum_meter.state_dict())
            meta = {
                "step": step,
                "world_size": self.dist.world_size,
                "stage": stage_at(self.cfg.curriculum, max(step - 1, 0))[0] + 1,
                "zero_stage": self.cfg.trainer.zero_stage,
                "frozen_encoders_saved": frozen_is_random(self.cfg.model),
                "data_seed": self.data_seed,
                "nonfinite_skipped": self.nonfinite_total,
                "ema": self.ema is not None,
                "reason": reason,
                ckpt.PINNED: reason == START_REASON,
                "time": time.time(),
            }
            final = publish_checkpoint(
                staging,
                meta,
                self.run_dir,
                self.resolved,
                self.cfg.trainer.keep_last,
                self.cfg.logger.wandb.enabled,
                log,
            )
        dist.barrier()
        return final

    # ----------------------------------------------------------------------------- validate
    def _val_metrics(self) -> dict[str, float]:
        """The validation loss of the current weights (on the main rank; {} elsewhere)."""
        started = time.perf_counter()
        metrics = self.val_loss.run(self.engine, self.ema)
        if self.dist.is_main:
            metrics["val/time_s"] = time.perf_counter() - started
            tasks = " ".join(
                f"{task} {metrics[f'val/loss_{task}']:.5f}"
                for task in VAL_TASKS
                if f"val/loss_{task}" in metrics
            )
            log.info(
                "step %d: val/loss %.5f (%s)",
                self.global_step,
                metrics.get("val/loss", float("nan")),
                tasks,
            )
        return metrics

    def _log_before_training(self, val: dict[str, float]) -> None:
        """The step-0 validation as a row of its own (there is no training loss yet)."""
        if self.metrics is None:
            return
        _, stage = stage_at(self.cfg.curriculum, 0)
        self.metrics.log_values({"step": 0, "stage": 1, "stage_name": stage.name, **val})

    def _validate(self) -> None:
        weights = None
        if self.ema is not None and self.cfg.trainer.validation.use_ema:
            weights = self.ema.gather(self.dist.is_main)
        media = self.validator.run(self.engine, self.global_step, ema_weights=weights)
        if self.metrics is not None and media:
            self.metrics.log_media(self.global_step, media)
