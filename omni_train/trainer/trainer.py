"""The Trainer owns the loop: build, resume, step, guard, log, save, stop."""

from __future__ import annotations

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
from omni_train.data.stream import ResumableLoader, build_loader
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_frozen_encoders
from omni_train.models.sequence_parallel import SequenceParallel, sequence_parallel_groups
from omni_train.models.weights import save_safetensors
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer import throughput
from omni_train.trainer.checkpoint_manager import (
    LOADER,
    CheckpointManager,
    LoaderPosition,
    rank_file,
)
from omni_train.trainer.config import VAL_TASKS
from omni_train.trainer.deepspeed_internals import discard_accumulated_gradients
from omni_train.trainer.ds_config import frozen_dtype
from omni_train.trainer.ema import ShardedEMA
from omni_train.trainer.finetune import (
    MODE_KEY,
    apply_finetune,
    base_file,
    base_metadata,
    check_resumed_mode,
    freezes_base,
    load_base,
    param_groups,
)
from omni_train.trainer.metrics import MetricsLogger
from omni_train.trainer.preemption import SignalFlag
from omni_train.trainer.profiling import StepProfiler
from omni_train.trainer.run_setup import (
    RunStart,
    agree_across_ranks,
    build_engine,
    start_run,
    stop_for_preemption,
)
from omni_train.trainer.run_state import (
    DenoiserTrainState,
    ResumePlan,
    read_json,
    resized_data_seed,
)
from omni_train.trainer.step import StepResult, StepTotals, compute_loss, step_seed
from omni_train.trainer.weights import export_weights, frozen_is_random

log = logging.getLogger(__name__)

# Reason of trainer.save_at_start's step-0 checkpoint, which pruning keeps.
START_REASON = "start"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss; the last good state was saved."""


class DataOrderError(RuntimeError):
    """A resume on another world size cannot continue the saved data order."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resolved: dict[str, Any]) -> None:
        self.cfg = cfg
        self.resolved = resolved
        start = start_run(cfg.trainer, cfg.run_dir, cfg.seed, cfg.data.batch_size, resolved, log)
        self.signals = start.signals
        with self.signals.restored_on_error():
            self.dist, self.run_dir, self.plan = start.dist, start.run_dir, start.plan
            self.device = self.dist.device
            self._build_sequence_parallel()
            self._build_engine(start.ds_cfg)
            self._build_run_state(start)
            if self.plan is not None:
                self._resume(self.plan)
            self.loader = self.data.build()
            self._build_observability()

    @property
    def global_step(self) -> int:
        """Training steps taken (a step whose update was skipped counts too)."""
        return self.state.step

    # ----------------------------------------------------------------------------- build
    def _build_sequence_parallel(self) -> None:
        """Groups of trainer.sequence_parallel consecutive ranks share each sample: the data,
        noise, timesteps and condition masks follow the data-parallel rank (rank // size), so
        they agree within a group. DeepSpeed still averages gradients over every rank, which
        is right for the sharded loss (omni_train/models/README.md)."""
        size = self.cfg.trainer.sequence_parallel
        self.sp: SequenceParallel | None = sequence_parallel_groups(size) if size > 1 else None
        self.dp_rank = self.dist.rank // size
        self.dp_world = self.dist.world_size // size
        # Metrics count each sample once: only the first rank of a group adds its sums.
        self.counts_samples = self.sp is None or self.sp.rank == 0

    def _build_engine(self, ds_cfg: dict[str, Any]) -> None:
        """The frozen encoders and the denoiser in its DeepSpeed engine, with the optimizer
        and lr schedule."""
        cfg = self.cfg
        # Same seed on every rank: random-init encoders and the denoiser agree everywhere.
        torch.manual_seed(cfg.seed)
        dtype = frozen_dtype(cfg.trainer, cuda=self.device.type == "cuda")
        self.encoders = build_frozen_encoders(cfg.model).to(self.device, dtype).eval()
        self.encoders.requires_grad_(False)
        denoiser = build_denoiser(cfg.model)
        finetune = cfg.trainer.finetune
        if self.plan is not None:
            check_resumed_mode(self.plan.meta, finetune, self.plan.checkpoint)
        if freezes_base(finetune):
            self._keep_base(denoiser)
        apply_finetune(denoiser, finetune)
        params = param_groups(denoiser, cfg.trainer.optimizer, finetune.mode)
        self.group_names = [group["name"] for group in params]
        self.engine, self.scheduler = build_engine(denoiser, params, cfg.trainer, ds_cfg)

    def _keep_base(self, denoiser: torch.nn.Module) -> None:
        """A frozen base the checkpoints will not hold: a random-init one is written into the
        run dir when the run starts, and loaded from there when it resumes."""
        if self.cfg.model.backbone.pretrained:
            return
        path = base_file(self.run_dir)
        if self.plan is not None:
            load_base(denoiser, path, f"the run in {self.run_dir}")
        elif self.dist.is_main:
            save_safetensors(denoiser.state_dict(), path)
            log.warning(
                "trainer.finetune.mode=%s freezes a random-init base (model.backbone.pretrained "
                "is empty), written to %s: fine for tests; a base whose output layers start at "
                "zero (this project's MMDiT) trains nothing this way",
                self.cfg.trainer.finetune.mode,
                path,
            )

    def _build_run_state(self, start: RunStart) -> None:
        """What a checkpoint keeps besides the engine (counters, EMA, curriculum counts, data
        position), and the CheckpointManager that saves and loads it."""
        cfg, trainer_cfg = self.cfg, self.cfg.trainer
        self.state = DenoiserTrainState(data_seed=cfg.seed)
        self.nonfinite_in_row = 0  # not saved: a resumed run starts a new streak
        self.ema = None
        if trainer_cfg.ema.enabled:
            self.ema = ShardedEMA(
                self.engine.module, trainer_cfg.ema, self.dist.rank, self.dist.world_size
            )
        self.curriculum_meter = CurriculumMeter(cfg.curriculum)
        self.data = LoaderPosition(self._build_loader)
        self.checkpoints = CheckpointManager(
            self.engine,
            start,
            trainer_cfg,
            self.resolved,
            cfg.logger.wandb.enabled,
            self.state,
            self.data,
            log,
            curriculum=self.curriculum_meter,
            ema=self.ema,
            trained_only=freezes_base(trainer_cfg.finetune),
        )

    def _build_loader(self, position: dict[str, Any] | None) -> ResumableLoader:
        cfg = self.cfg
        return build_loader(
            cfg.data,
            self.dp_rank,
            self.dp_world,
            self.state.data_seed,
            position,
            curriculum=cfg.curriculum,
            grad_accum=cfg.trainer.grad_accum,
            model_cfg=cfg.model,
        )

    def _build_observability(self) -> None:
        """Throughput figures, the profiler, validation (sampling and loss) and the metrics
        sinks."""
        cfg, trainer_cfg = self.cfg, self.cfg.trainer
        self.tokens_per_sample = throughput.tokens_per_sample(
            cfg.model, cfg.data.resolution, cfg.data.num_frames
        )
        self.peak_tflops = throughput.detect_peak_tflops(
            trainer_cfg.peak_tflops, trainer_cfg.precision
        )
        self.profiler = StepProfiler(trainer_cfg.profiler, self.run_dir / "profile", self.dist.rank)
        self.validator = None
        if trainer_cfg.validation.every > 0:
            from omni_train.trainer.validation import Validator

            self.validator = Validator(cfg, self.run_dir, self.dist, self.encoders)
        self.val_loss = None
        if trainer_cfg.val_every > 0 or trainer_cfg.val_at_start:
            from omni_train.trainer.val_loss import ValLoss

            self.val_loss = ValLoss(
                trainer_cfg.val_loss,
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
                self.resolved,
                self.global_step,
                trainer_cfg.max_steps,
                progress_bar=trainer_cfg.progress_bar,
            )

    # ----------------------------------------------------------------------------- resume
    def _resume(self, plan: ResumePlan) -> None:
        world_size = self.dist.world_size
        if plan.resized(world_size):
            log.warning(
                "%s was saved by %d ranks; this run has %d: resuming from a universal "
                "checkpoint (weights, optimizer state and data position re-partitioned)",
                plan.checkpoint,
                plan.saved_world_size,
                world_size,
            )
        # Same world size but another trainer.sequence_parallel: another data-parallel layout.
        if (
            self.checkpoints.load(plan)
            or read_json(plan.checkpoint / rank_file(LOADER, self.dist.rank))["world_size"]
            != self.dp_world
        ):
            self._redeal_data(plan)

    def _redeal_data(self, plan: ResumePlan) -> None:
        """Deal the interrupted epoch's remaining samples out to the new ranks. Saved states
        that cannot be re-dealt stop the run (samples would be skipped or repeated) unless
        trainer.allow_new_data_order accepts a new, reproducible order."""
        saved = [read_json(p) for p in sorted(plan.checkpoint.glob("loader_rank*.json"))]
        # The ranks of a sequence-parallel group saved the same state: keep one per dp rank.
        saved = list({state["rank"]: state for state in saved}.values())
        try:
            position = elastic_loader_state(saved, self.dp_rank, self.dp_world, self.cfg.data)
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
            self.state.data_seed = resized_data_seed(plan.data_seed, plan.step)
            return
        self.data.load_state_dict(position)

    # ----------------------------------------------------------------------------- loop
    def run(self) -> None:
        trainer_cfg = self.cfg.trainer
        batches = iter(self.loader)
        flag = self.signals
        try:
            if self.plan is None:  # a fresh start; a resumed run did this before its save
                self._before_first_update()
            while self.global_step < trainer_cfg.max_steps:
                started = time.perf_counter()
                with self.profiler.step(self.global_step):
                    result, data_wait, finite, stop = self._train_step(batches, flag)
                self.state.step += 1
                elapsed = time.perf_counter() - started
                self._after_update(finite)
                val = None
                if trainer_cfg.val_every > 0 and self.global_step % trainer_cfg.val_every == 0:
                    val = self._val_metrics()
                if (
                    self.global_step % trainer_cfg.log_every == 0
                    or self.global_step == trainer_cfg.max_steps
                    or val is not None
                ):
                    self._log(result, elapsed, data_wait, finite, val)
                if self.nonfinite_in_row >= trainer_cfg.nonfinite.max_consecutive:
                    self._stop_nonfinite()
                if stop:
                    self._stop_preempted(flag)
                saved = None
                if (
                    self.global_step % trainer_cfg.save_every == 0
                    or self.global_step == trainer_cfg.max_steps
                ):
                    saved = self.save()
                validated = (
                    self.validator is not None
                    and self.global_step % trainer_cfg.validation.every == 0
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
        trainer_cfg = self.cfg.trainer
        if self.val_loss is not None and trainer_cfg.val_at_start:
            self._log_before_training(self._val_metrics())
        if trainer_cfg.save_at_start:
            self.save(reason=START_REASON)

    def _after_update(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_row = 0
            if self.ema is not None:
                self.ema.update(self.global_step)
            return
        self.state.nonfinite_skipped += 1
        self.nonfinite_in_row += 1
        # The skipped update did not step the engine's schedule; keep lr tied to the step.
        self.scheduler.step()
        if self.dist.is_main:
            log.warning(
                "step %d: non-finite loss, update skipped (%d in a row, %d in total)",
                self.global_step,
                self.nonfinite_in_row,
                self.state.nonfinite_skipped,
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
            masks = condition_masks(cfg.curriculum, step_index, batch.keys, batch.quality, cfg.seed)
            self.curriculum_meter.add(step_index, masks, batch.quality, batch.has_audio)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(cfg.seed, step_index, self.dp_rank, micro))
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
                sequence_parallel=self.sp,
            )
            result.corrupt_skipped = self.loader.corrupt_skipped  # this rank's count so far
            bad, stop = self._agree(not bool(torch.isfinite(result.loss)), flag.raised)
            results.append(result.detach())
            if bad:
                finite = False
                discard_accumulated_gradients(self.engine, micro, self.cfg.trainer.grad_accum)
                continue
            self.engine.backward(result.loss)
            self.engine.step()
        return StepResult.merge(results), data_wait, finite, stop

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
        finetune = self.cfg.trainer.finetune
        work = throughput.flops_of_samples(
            self.cfg.model,
            data.resolution,
            data.num_frames,
            result.text_tokens,
            finetune.mode,
            finetune.lora_rank,
        )
        vector = result.totals(flops=work).to_tensor(self.device)
        if not self.counts_samples:
            vector.zero_()
        dist.all_reduce(vector)
        totals = StepTotals.from_tensor(vector)
        peaks = throughput.peak_memory_gb(self.device)
        peak_values = torch.tensor(list(peaks.values()), device=self.device)
        dist.all_reduce(peak_values, op=dist.ReduceOp.MAX)
        row = totals.row()
        counts = torch.tensor(
            self.curriculum_meter.vector(), dtype=torch.float64, device=self.device
        )
        if not self.counts_samples:
            counts.zero_()
        dist.all_reduce(counts)
        row.update(self.curriculum_meter.flush(self.global_step - 1, counts.tolist()))
        grad_norm = self.engine.get_global_grad_norm() if finite else None
        samples_per_s = row["batch_size"] / max(elapsed, 1e-9)
        flops_per_sample = totals.flops / max(row["batch_size"], 1)
        lrs = self.scheduler.get_last_lr()
        row.update(
            step=self.global_step,
            stage=stage_index + 1,
            stage_name=stage.name,
            lr=lrs[0],  # the first group's: backbone (full), lora or new_modules
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            samples_per_s=samples_per_s,
            tokens_per_s=samples_per_s * self.tokens_per_sample,
            text_tokens=totals.text_tokens / max(row["batch_size"], 1),
            tflops_per_s=samples_per_s * flops_per_sample / 1e12,
            step_time_s=elapsed,
            data_wait_s=data_wait,
            data_wait_frac=data_wait / max(elapsed, 1e-9),
            num_motion_latents=result.num_motion_latents,
            nonfinite_skipped=self.state.nonfinite_skipped,
            update_skipped=int(not finite),
        )
        for name, lr in list(zip(self.group_names, lrs, strict=True))[1:]:
            row[f"lr_{name}"] = lr
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
        """Checkpoint the current step (every rank must call it); returns its folder."""
        step = self.global_step
        finetune = self.cfg.trainer.finetune
        return self.checkpoints.save(
            reason,
            self._export_weights,
            stage=stage_at(self.cfg.curriculum, max(step - 1, 0))[0] + 1,
            frozen_encoders_saved=frozen_is_random(self.cfg.model),
            ema=self.ema is not None,
            **{ckpt.PINNED: reason == START_REASON},
            **({MODE_KEY: finetune.mode} if freezes_base(finetune) else {}),
        )

    def _export_weights(self, staging: Path, weights: dict[str, torch.Tensor]) -> None:
        """The denoiser's weights (and random-init encoders') for sampling, beside the
        checkpoint: all of them, or with a frozen base what trained and where the base is."""
        metadata = base_metadata(self.cfg.model, self.cfg.trainer.finetune)
        export_weights(self.engine, self.encoders, self.cfg.model, staging, True, weights, metadata)

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
