"""Validation during training: sample short clips from fixed inputs every N steps.

The inputs are fixed for the whole run (given files; else the first held-out clips the
validation loss uses, when data.val_shards or data.val_holdout gives some; else the first
clips of the training shards in the seeded order), so the clips of successive steps show how
the model moves.
The main rank samples with a plain copy of the denoiser built from the consolidated (or
EMA) weights; other ranks only take part in gathering them.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from omni_train.config import TrainConfig
from omni_train.trainer.distributed import DistInfo
from omni_train.trainer.val_loss import held_out_samples, val_source
from omni_train.trainer.weights import consolidated_state

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, cfg: TrainConfig, run_dir: Path, dist_info: DistInfo, encoders) -> None:
        vcfg = cfg.trainer.validation
        if vcfg.ref_images and len(vcfg.audio) != len(vcfg.ref_images):
            raise ValueError(
                "trainer.validation.audio must list one audio file per entry of "
                f"trainer.validation.ref_images ({len(vcfg.audio)} vs {len(vcfg.ref_images)})"
            )
        self.cfg = cfg
        self.out_root = run_dir / "validation"
        self.dist = dist_info
        self.encoders = encoders
        self._inputs: list[tuple[torch.Tensor, torch.Tensor, str]] | None = None

    def inputs(self) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        """(reference (1, 3, H, W), 16 kHz audio, caption) per validation clip."""
        if self._inputs is not None:
            return self._inputs
        vcfg, data = self.cfg.trainer.validation, self.cfg.data
        if vcfg.ref_images:
            from omni_train.media import AUDIO_RATE, read_audio, reference_tensor

            captions = list(vcfg.captions) + [""] * len(vcfg.ref_images)
            self._inputs = [
                (
                    reference_tensor(ref, data.resolution),
                    torch.from_numpy(read_audio(audio, AUDIO_RATE)),
                    captions[i],
                )
                for i, (ref, audio) in enumerate(zip(vcfg.ref_images, vcfg.audio, strict=True))
            ]
        elif val_source(data):
            samples = held_out_samples(data, vcfg.num_clips, self.cfg.trainer.val_loss.noise_seed)
            self._inputs = [(s["ref"][None], s["audio"], s["caption"]) for s in samples]
        else:
            from omni_train.data.stream import build_loader

            loader = build_loader(
                replace(data, num_workers=0), 0, 1, self.cfg.seed, model_cfg=self.cfg.model
            )
            batch = next(iter(loader))
            count = min(vcfg.num_clips, len(batch))
            self._inputs = [
                (batch.ref[i : i + 1], batch.audio[i], batch.captions[i]) for i in range(count)
            ]
        return self._inputs

    @torch.no_grad()
    def run(self, engine, step: int, ema_weights: dict | None = None) -> dict[str, Path]:
        """Sample the validation clips; returns {name: mp4 path} on the main rank."""
        state = consolidated_state(engine, self.dist.is_main)
        if not self.dist.is_main:
            return {}
        from omni_train.diffusion.sampler import generate_long_video
        from omni_train.media import AUDIO_RATE, to_uint8_frames, write_mp4
        from omni_train.trainer.finetune import build_finetuned_denoiser

        # Built as the trainer trains it (adapters included), so the engine's state fits.
        denoiser = build_finetuned_denoiser(self.cfg.model, self.cfg.trainer.finetune)
        denoiser.load_state_dict({**state, **(ema_weights or {})})
        denoiser.to(self.dist.device).float().eval()
        diffusion = replace(
            self.cfg.diffusion, sampling_steps=self.cfg.trainer.validation.sampling_steps
        )
        frames, fps = self.cfg.data.num_frames, self.cfg.data.fps
        out_dir = self.out_root / f"step_{step:08d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        media = {}
        for index, (ref, audio, caption) in enumerate(self.inputs()):
            generator = torch.Generator().manual_seed(self.cfg.seed + index)
            needed = round(frames / fps * AUDIO_RATE)
            clip_audio = torch.zeros(needed)
            clip_audio[: min(needed, len(audio))] = audio[:needed].float()
            video = generate_long_video(
                denoiser,
                self.encoders,
                ref,
                clip_audio,
                caption,
                fps,
                frames,
                frames,
                diffusion,
                generator,
            )
            path = out_dir / f"clip_{index}.mp4"
            write_mp4(path, to_uint8_frames(video[0]), fps, clip_audio.numpy(), AUDIO_RATE)
            media[f"validation/clip_{index}"] = path
        log.info("validation clips of step %d written to %s", step, out_dir)
        return media
