"""The VAE trainer: the denoiser trainer's machinery (DeepSpeed, atomic checkpoints, exact
resume, W&B, preemption) around the causal VAE and its reconstruction losses."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from omni_train.data.stream import ResumableLoader, build_loader
from omni_train.models.encoders import build_vae
from omni_train.models.vae import vae_arch, vae_file_metadata
from omni_train.models.weights import save_safetensors
from omni_train.trainer.checkpoint_manager import CheckpointManager, LoaderPosition
from omni_train.trainer.metrics import MetricsLogger
from omni_train.trainer.preemption import SignalFlag
from omni_train.trainer.run_setup import (
    RunStart,
    agree_across_ranks,
    build_engine,
    start_run,
    stop_for_preemption,
)
from omni_train.trainer.run_state import ResumePlan, TrainState, resized_data_seed
from omni_train.trainer.step import step_seed
from omni_train.vae_training.config import TrainVAEConfig
from omni_train.vae_training.losses import vae_losses
from omni_train.vae_training.metrics import (
    fixed_clips,
    latent_normalisation,
    reconstruction_scores,
)

log = logging.getLogger(__name__)

VAE_FILE = "vae.safetensors"
LOSS_NAMES = ("loss", "loss_l1", "loss_ssim", "loss_kl")


class NonFiniteVAELossError(RuntimeError):
    """A NaN/Inf loss: no update was applied; the last checkpoint is intact."""


def frames_as_images(video: Tensor, per_clip: int, generator: torch.Generator) -> Tensor:
    """(B, C, T, H, W) -> (B * per_clip, C, 1, H, W): frames drawn from each clip."""
    batch, _, frames = video.shape[:3]
    index = torch.randint(frames, (batch, per_clip), generator=generator, device=video.device)
    picked = video[torch.arange(batch, device=video.device)[:, None], :, index]
    return picked.flatten(0, 1).unsqueeze(2)


class VAEMetricsLogger(MetricsLogger):
    """The denoiser's metrics sinks with a console line that fits VAE rows."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.progress is not None and self.progress.interactive:
            self.progress = None  # its bar shows curriculum stages; log lines instead

    def _console_line(self, row: dict[str, Any]) -> str:
        if "loss" not in row:
            return f"step {row['step']}: " + " ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val/")
            )
        return (
            f"step {row['step']}/{self.max_steps} loss {row['loss']:.4f} "
            f"(l1 {row['loss_l1']:.4f} ssim {row['loss_ssim']:.4f} kl {row['loss_kl']:.2f}) "
            f"lr {row['lr']:.2e} {row['frames_per_s']:.1f} frames/s"
        )


class VAETrainer:
    def __init__(self, cfg: TrainVAEConfig, resolved: dict[str, Any]) -> None:
        self.cfg = cfg
        self.resolved = resolved
        start = start_run(cfg.trainer, cfg.run_dir, cfg.seed, cfg.data.batch_size, resolved, log)
        self.signals = start.signals
        with self.signals.restored_on_error():
            self.dist, self.run_dir, self.plan = start.dist, start.run_dir, start.plan
            self.device = self.dist.device
            self._build_engine(start.ds_cfg)
            self._build_run_state(start)
            if self.plan is not None:
                self._resume(self.plan)
            self.loader = self.data.build()
            self._build_evaluation()
            self._build_observability()

    @property
    def global_step(self) -> int:
        return self.state.step

    # ----------------------------------------------------------------------------- build
    def _build_engine(self, ds_cfg: dict[str, Any]) -> None:
        """The VAE in its DeepSpeed engine, with the optimizer and lr schedule."""
        torch.manual_seed(self.cfg.seed)  # same initial weights on every rank
        # model.vae.pretrained starts from given weights (fine-tuning); "" from random init.
        vae = build_vae(self.cfg.model.vae)
        self.engine, self.scheduler = build_engine(vae, vae.parameters(), self.cfg.trainer, ds_cfg)

    def _build_run_state(self, start: RunStart) -> None:
        """What a checkpoint keeps besides the engine (counters, data position), and the
        CheckpointManager that saves and loads it."""
        self.state = TrainState(data_seed=self.cfg.seed)
        self.data = LoaderPosition(self._build_loader)
        self.checkpoints = CheckpointManager(
            self.engine,
            start,
            self.cfg.trainer,
            self.resolved,
            self.cfg.logger.wandb.enabled,
            self.state,
            self.data,
            log,
        )

    def _build_loader(self, position: dict[str, Any] | None) -> ResumableLoader:
        return build_loader(
            self.cfg.data,
            self.dist.rank,
            self.dist.world_size,
            self.state.data_seed,
            position,
            grad_accum=self.cfg.trainer.grad_accum,
        )

    def _build_evaluation(self) -> None:
        """The fixed clips of validation and of the latent statistics."""
        cfg, recipe = self.cfg, self.cfg.vae_training
        self.val_clips: list[Tensor] = []
        if cfg.data.val_shards:
            self.val_clips = fixed_clips(cfg.data, cfg.data.val_shards, recipe.val_clips, cfg.seed)
        self.stat_clips = fixed_clips(cfg.data, cfg.data.shards, recipe.latent_stat_clips, cfg.seed)
        self.last_scores: dict[str, float] = {}

    def _build_observability(self) -> None:
        self.metrics = None
        if self.dist.is_main:
            self.metrics = VAEMetricsLogger(
                self.cfg.logger,
                self.run_dir,
                self.cfg.experiment,
                self.resolved,
                self.global_step,
                self.cfg.trainer.max_steps,
                progress_bar=self.cfg.trainer.progress_bar,
            )

    # ----------------------------------------------------------------------------- resume
    def _resume(self, plan: ResumePlan) -> None:
        if plan.resized(self.dist.world_size):
            log.warning(
                "%s was saved by %d ranks, this run has %d: resuming from a universal checkpoint",
                plan.checkpoint,
                plan.saved_world_size,
                self.dist.world_size,
            )
        if self.checkpoints.load(plan):
            # Reconstruction does not care which clips come next: a new, seeded order.
            self.state.data_seed = resized_data_seed(plan.data_seed, plan.step)

    # ----------------------------------------------------------------------------- loop
    def run(self) -> None:
        trainer_cfg, recipe = self.cfg.trainer, self.cfg.vae_training
        batches = iter(self.loader)
        flag = self.signals
        try:
            while self.global_step < trainer_cfg.max_steps:
                started = time.perf_counter()
                totals, clips, frames, data_wait, stop = self._train_step(batches, flag)
                self.state.step += 1
                elapsed = time.perf_counter() - started
                if (
                    self.global_step % trainer_cfg.log_every == 0
                    or self.global_step == trainer_cfg.max_steps
                ):
                    self._log(totals, clips, frames, elapsed, data_wait)
                if stop:
                    self._stop_preempted(flag)
                last = self.global_step == trainer_cfg.max_steps
                every = recipe.val_every
                validated = bool(self.val_clips) and (
                    last or (every > 0 and self.global_step % every == 0)
                )
                if validated:
                    self.validate()
                saved = None
                if self.global_step % trainer_cfg.save_every == 0 or last:
                    saved = self.save()
                # A signal during validation or a save stops now, not one step later.
                if (validated or saved) and agree_across_ranks(False, flag.raised, self.device)[1]:
                    self._stop_preempted(flag, saved)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            flag.restore()
        if self.dist.is_main:
            log.info("training finished at step %d; run dir %s", self.global_step, self.run_dir)

    def _train_step(self, batches, flag: SignalFlag) -> tuple[Tensor, int, int, float, bool]:
        cfg, recipe = self.cfg, self.cfg.vae_training
        step_index = self.global_step
        totals = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        clips = frames = 0
        data_wait, stop = 0.0, False
        self.engine.train()
        for micro in range(cfg.trainer.grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited
            video = batch.video.to(self.device)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(cfg.seed, step_index, self.dist.rank, micro))
            if step_index < recipe.image_steps:
                video = frames_as_images(video, recipe.image_frames, generator)
            recon, mean, logvar = self.engine(video, generator, recipe.sample_posterior)
            losses = vae_losses(recon, video, mean, logvar, recipe.loss)
            nonfinite = not bool(torch.isfinite(losses.total))
            bad, stop = agree_across_ranks(nonfinite, flag.raised, self.device)
            if bad:
                raise NonFiniteVAELossError(
                    f"step {step_index + 1}: the VAE loss is NaN/Inf on some rank; no update "
                    "was applied. Lower trainer.optimizer.lr or vae_training.loss.kl and "
                    "restart the same command to resume from the last checkpoint"
                )
            self.engine.backward(losses.total)
            self.engine.step()
            totals += losses.as_tensor()
            clips += video.shape[0]
            frames += video.shape[0] * video.shape[2]
        return totals / cfg.trainer.grad_accum, clips, frames, data_wait, stop

    def _log(self, totals: Tensor, clips: int, frames: int, elapsed: float, wait: float) -> None:
        summed = torch.cat([totals, torch.tensor([clips, frames], dtype=torch.float64)])
        dist.all_reduce(summed)
        world = self.dist.world_size
        row: dict[str, Any] = {
            name: float(v) / world for name, v in zip(LOSS_NAMES, summed[:4], strict=True)
        }
        grad_norm = self.engine.get_global_grad_norm()
        row.update(
            step=self.global_step,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            image_phase=int(self.global_step <= self.cfg.vae_training.image_steps),
            batch_size=int(summed[4]),
            samples_per_s=float(summed[4]) / max(elapsed, 1e-9),
            frames_per_s=float(summed[5]) / max(elapsed, 1e-9),
            step_time_s=elapsed,
            data_wait_s=wait,
        )
        if self.metrics is not None:
            self.metrics.log(row)

    def _stop_preempted(self, flag: SignalFlag, saved: Path | None = None) -> None:
        stop_for_preemption(self, flag, saved, log)

    # ----------------------------------------------------------------------------- evaluate
    def reconstruct(self, video: Tensor) -> Tensor:
        """The posterior mean decoded (every rank must call it under ZeRO-3)."""
        with torch.no_grad():
            return self.engine(video.to(self.device), None, False)[0]

    def validate(self) -> dict[str, float]:
        """Held-out PSNR / SSIM, logged at the current step. Every rank scores the same clips
        (ZeRO-3 needs all of them in each forward); the main rank logs."""
        self.engine.eval()
        scores = reconstruction_scores(self.reconstruct, self.val_clips)
        self.engine.train()
        self.last_scores = scores
        if self.metrics is not None:
            self.metrics.log({"step": self.global_step, **scores})
        return scores

    def latent_stats(self) -> tuple[float, float]:
        """(shift, scale) of the posterior means of the fixed training clips."""
        self.engine.eval()
        with torch.no_grad():
            means = [self.engine.module.posterior(c.to(self.device))[0] for c in self.stat_clips]
        self.engine.train()
        return latent_normalisation(means)

    # ----------------------------------------------------------------------------- save
    def save(self, reason: str = "cadence") -> Path:
        """Checkpoint the current step (every rank must call it); returns its folder. The
        last step's VAE file is also published as run_dir/vae.safetensors."""
        shift, scale = self.latent_stats()
        metadata = vae_file_metadata(self.cfg.model.vae, shift, scale)

        def export(staging: Path, weights: dict[str, Tensor]) -> None:
            save_safetensors(weights, staging / VAE_FILE, metadata=metadata)

        final = self.checkpoints.save(
            reason,
            export,
            latent_shift=shift,
            latent_scale=scale,
            **{k.replace("/", "_"): v for k, v in self.last_scores.items()},
        )
        if self.dist.is_main and self.global_step == self.cfg.trainer.max_steps:
            self._publish_result(final, shift, scale)
        return final

    def _publish_result(self, checkpoint: Path, shift: float, scale: float) -> None:
        """run_dir/vae.safetensors (the end product) and how to use it."""
        target = self.run_dir / VAE_FILE
        tmp = target.with_name(f".{VAE_FILE}.tmp")
        shutil.copyfile(checkpoint / VAE_FILE, tmp)
        tmp.replace(target)
        defaults = vae_arch(type(self.cfg.model.vae)())
        overrides = [
            f"model.vae.{name}={json.dumps(value).replace(' ', '')}"
            for name, value in vae_arch(self.cfg.model.vae).items()
            if value != defaults[name]
        ]
        scores = " ".join(f"{k} {v:.4f}" for k, v in self.last_scores.items() if k != "val/frames")
        log.info(
            "wrote %s (latent shift %.4f, scale %.4f, applied by model.vae.pretrained when "
            "model.vae.scaling_factor / shift_factor are left at 1 / 0)%s\n  use it: %s",
            target,
            shift,
            scale,
            f"; held-out {scores}" if scores else "",
            " ".join([f"model.vae.pretrained={target}", *overrides]),
        )
