"""The Trainer owns the loop: build, resume, step, log, save."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from omni_train.config import TrainConfig
from omni_train.curriculum import condition_masks, motion_latents_for_step, stage_at
from omni_train.data.stream import build_loader
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_frozen_encoders
from omni_train.models.vae import latent_frames
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer.distributed import init_distributed
from omni_train.trainer.ds_config import deepspeed_config
from omni_train.trainer.metrics import MetricsLogger
from omni_train.trainer.step import StepResult, compute_loss, step_seed
from omni_train.trainer.weights import export_weights, frozen_is_random

log = logging.getLogger(__name__)


def _param_groups(denoiser: torch.nn.Module, lr: float, new_scale: float) -> list[dict]:
    new, backbone = [], []
    for name, param in denoiser.named_parameters():
        if param.requires_grad:
            (new if name.startswith(denoiser.new_module_prefixes) else backbone).append(param)
    groups = [{"params": backbone, "lr": lr}]
    if new:
        groups.append({"params": new, "lr": lr * new_scale})
    return groups


def _warmup(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Trainer:
    def __init__(self, cfg: TrainConfig, resolved: dict[str, Any]) -> None:
        import deepspeed

        self.cfg = cfg
        tcfg = cfg.trainer
        self.dist = init_distributed(
            tcfg.dist_backend, tcfg.dist_timeout_minutes, tcfg.cpu_shm_comm
        )
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        ds_cfg = deepspeed_config(tcfg, cfg.data.batch_size, self.dist.world_size)
        if self.dist.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            for stale in ckpt.clear_staging(self.ckpt_root):
                log.warning("removed unfinished checkpoint %s", stale)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2))
        self.resolved = resolved
        dist.barrier()

        # Same seed on every rank: random-init encoders and the denoiser agree everywhere.
        torch.manual_seed(cfg.seed)
        self.encoders = build_frozen_encoders(cfg.model).to(self.device).eval()
        self.encoders.requires_grad_(False)
        denoiser = build_denoiser(cfg.model)
        opt_cfg = tcfg.optimizer
        optimizer = torch.optim.AdamW(
            _param_groups(denoiser, opt_cfg.lr, opt_cfg.new_module_lr_scale),
            lr=opt_cfg.lr,
            betas=tuple(opt_cfg.betas),
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(opt_cfg.warmup_steps))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=denoiser, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )

        self.global_step = 0
        loader_state = self._resume()
        self.loader = build_loader(
            cfg.data, self.dist.rank, self.dist.world_size, cfg.seed, loader_state
        )
        self.metrics = None
        if self.dist.is_main:
            self.metrics = MetricsLogger(
                cfg.logger,
                self.run_dir,
                cfg.experiment,
                resolved,
                self.global_step,
                tcfg.max_steps,
            )

    # ----------------------------------------------------------------------------- resume
    def _resume(self) -> dict | None:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return None
        meta = ckpt.read_meta(latest)
        if meta["world_size"] != self.dist.world_size:
            raise RuntimeError(
                f"{latest} was saved with {meta['world_size']} ranks and this run has "
                f"{self.dist.world_size}: restart with --nproc_per_node/--nnodes giving "
                f"{meta['world_size']} ranks, or start a new run_dir"
            )
        self.engine.load_checkpoint(
            str(self.ckpt_root),
            tag=latest.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        self.global_step = int(meta["step"])
        log.info("resumed from %s (step %d)", latest, self.global_step)
        state_path = latest / f"loader_rank{self.dist.rank:05d}.json"
        return json.loads(state_path.read_text(encoding="utf-8"))

    # ----------------------------------------------------------------------------- loop
    def run(self) -> None:
        tcfg = self.cfg.trainer
        batches = iter(self.loader)
        try:
            while self.global_step < tcfg.max_steps:
                started = time.perf_counter()
                result, data_wait = self._train_step(batches)
                self.global_step += 1
                elapsed = time.perf_counter() - started
                if self.global_step % tcfg.log_every == 0 or self.global_step == tcfg.max_steps:
                    self._log(result, elapsed, data_wait)
                if self.global_step % tcfg.save_every == 0 or self.global_step == tcfg.max_steps:
                    self.save()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self.dist.is_main:
            log.info("training finished at step %d; run dir %s", self.global_step, self.run_dir)

    def _train_step(self, batches) -> tuple[StepResult, float]:
        cfg = self.cfg
        step_index = self.global_step  # steps completed before this one
        n_motion = motion_latents_for_step(
            cfg.curriculum, step_index, cfg.seed, latent_frames(cfg.diffusion.motion_frames)
        )
        results, data_wait = [], 0.0
        for micro in range(cfg.trainer.grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited
            masks = condition_masks(
                cfg.curriculum, step_index, batch["keys"], batch["quality"], cfg.seed
            )
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
            self.engine.backward(result.loss)
            self.engine.step()
            results.append(result.detach())
        return StepResult.merge(results), data_wait

    def _log(self, result: StepResult, elapsed: float, data_wait: float) -> None:
        stage_index, stage = stage_at(self.cfg.curriculum, self.global_step - 1)
        totals = result.totals(self.device)
        dist.all_reduce(totals)
        row = result.row_from_totals(totals.tolist())
        grad_norm = self.engine.get_global_grad_norm()
        row.update(
            step=self.global_step,
            stage=stage_index + 1,
            stage_name=stage.name,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            samples_per_s=row["batch_size"] / max(elapsed, 1e-9),
            step_time_s=elapsed,
            data_wait_s=data_wait,
            num_motion_latents=result.num_motion_latents,
        )
        if self.metrics is not None:
            self.metrics.log(row)

    # ----------------------------------------------------------------------------- save
    def save(self) -> Path:
        step = self.global_step
        staging = ckpt.staging_dir(self.ckpt_root, step)
        if self.dist.is_main:
            ckpt.clear_staging(self.ckpt_root)
            staging.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=staging.name, save_latest=False)
        state = self.loader.state_dict()
        ckpt.write_json_atomic(staging / f"loader_rank{self.dist.rank:05d}.json", state)
        export_weights(self.engine, self.encoders, self.cfg.model, staging, self.dist.is_main)
        dist.barrier()
        final = staging.with_name(ckpt.checkpoint_name(step))
        if self.dist.is_main:
            (staging / "config.yaml").write_text(OmegaConf.to_yaml(self.resolved))
            meta = {
                "step": step,
                "world_size": self.dist.world_size,
                "stage": stage_at(self.cfg.curriculum, max(step - 1, 0))[0] + 1,
                "zero_stage": self.cfg.trainer.zero_stage,
                "frozen_encoders_saved": frozen_is_random(self.cfg.model),
                "time": time.time(),
            }
            final = ckpt.publish(staging, meta)
            for old in ckpt.prune(self.ckpt_root, self.cfg.trainer.keep_last):
                log.info("removed old checkpoint %s", old)
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final
