"""Sampling entry point: a reference image and an audio track -> an mp4 with that audio.

    python -m omni_train.sample checkpoint=RUN_DIR/checkpoints/step_N ref_image=IMG \
        audio=WAV out=OUT.mp4 [caption="..."] [seconds=4] [sampling_steps=N] \
        [trust_checkpoint_code=true]

The video is generated segment by segment; each segment after the first is conditioned on
the last 5 frames of the one before (motion frames, paper §3.4).

    torchrun --standalone --nproc_per_node 3 -m omni_train.sample ...

runs each denoising step's guidance passes (unconditional, text, text + audio) on different
ranks (omni_train/diffusion/cfg_parallel.py; 2 ranks split them 2 + 1); rank 0 writes OUT.
With ``sequence_parallel=N`` (torchrun --nproc_per_node N, 2N or 3N) groups of N ranks also
split each denoiser call's latent frames (omni_train/diffusion/sequence_parallel_sampling.py).

The run is loaded by omni_train/runs.py, which accepts only this project's ``_target_``
entries from the checkpoint's config.yaml unless ``trust_checkpoint_code=true`` is given.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from omni_train.config import SampleConfig, register_configs
from omni_train.contracts import is_causal_frame_count
from omni_train.runs import load_run

if TYPE_CHECKING:
    from omni_train.diffusion.cfg_parallel import CFGParallel

log = logging.getLogger("omni_train.sample")
register_configs()


def output_frames(seconds: float, audio_seconds: float, fps: float, segment_frames: int) -> int:
    """Frames to generate: the requested (or the audio's) length, at least two segments."""
    wanted = round((seconds if seconds > 0 else audio_seconds) * fps)
    return max(wanted, 2 * segment_frames - 5)


def run_sampling(cfg: SampleConfig) -> Path | None:
    """Write the sample; returns its path (None on the other ranks of a torchrun launch)."""
    from omni_train.diffusion.cfg_parallel import cfg_parallel_from_env

    with cfg_parallel_from_env("cpu", cfg.sequence_parallel) as parallel:
        return _sample(cfg, parallel)


def _sample(cfg: SampleConfig, parallel: CFGParallel | None) -> Path | None:
    from omni_train.diffusion.sampler import generate_long_video
    from omni_train.media import (
        AUDIO_RATE,
        read_audio,
        reference_tensor,
        to_uint8_frames,
        write_mp4,
    )

    torch.manual_seed(cfg.seed)
    run = load_run(
        cfg.checkpoint, use_ema=cfg.use_ema, trust_checkpoint_code=cfg.trust_checkpoint_code
    )
    train_cfg = run.cfg
    diffusion = train_cfg.diffusion
    if cfg.sampling_steps > 0:
        diffusion.sampling_steps = cfg.sampling_steps
    fps = train_cfg.data.fps
    segment = cfg.segment_frames or train_cfg.data.num_frames
    if segment <= diffusion.motion_frames or not is_causal_frame_count(segment):
        raise ValueError(
            f"segment_frames={segment}: needs 1 + 4k frames and more than the "
            f"{diffusion.motion_frames} motion frames (e.g. 17 or 33)"
        )
    ref = reference_tensor(cfg.ref_image, train_cfg.data.resolution)
    waveform = read_audio(cfg.audio, AUDIO_RATE)
    total = output_frames(cfg.seconds, len(waveform) / AUDIO_RATE, fps, segment)
    needed = round(total / fps * AUDIO_RATE)
    audio = torch.zeros(needed)
    audio[: min(needed, len(waveform))] = torch.from_numpy(waveform[:needed])
    generator = torch.Generator().manual_seed(cfg.seed)
    log.info(
        "sampling %d frames (%.2f s at %g fps) in segments of %d from %s",
        total,
        total / fps,
        fps,
        segment,
        run.checkpoint,
    )
    with torch.no_grad():
        video = generate_long_video(
            run.denoiser,
            run.encoders,
            ref,
            audio,
            cfg.caption,
            fps,
            total,
            segment,
            diffusion,
            generator,
            parallel=parallel,
        )
    if video is None:
        return None
    out = Path(cfg.out)
    write_mp4(out, to_uint8_frames(video[0]), fps, audio.numpy(), AUDIO_RATE)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(raw: DictConfig) -> None:
    cfg: SampleConfig = OmegaConf.to_object(raw)
    try:
        out = run_sampling(cfg)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        sys.exit(2)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
