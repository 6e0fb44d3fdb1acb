"""Sampling entry point: a reference image and an audio track -> an mp4 with that audio.

    python -m omni_train.sample checkpoint=RUN_DIR/checkpoints/step_N ref_image=IMG \
        audio=WAV out=OUT.mp4 [caption="..."] [seconds=4] [sampling_steps=N] \
        [trust_checkpoint_code=true]

The video is generated segment by segment; each segment after the first is conditioned on
the last 5 frames of the one before (motion frames, paper §3.4).

The model is rebuilt from the checkpoint's config.yaml, whose ``_target_`` entries (another
VAE or encoder, omni_train/models/adapters.py) are imported and called. Only this project's
code (``omni_train.*``, ``data_pipelines.*``) is accepted from a checkpoint unless
``trust_checkpoint_code=true`` is given, as for transformers' ``trust_remote_code``: a run
dir is trusted input, and one from elsewhere could name any function.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from omni_train.config import SampleConfig, TrainConfig, register_configs
from omni_train.contracts import is_causal_frame_count

log = logging.getLogger("omni_train.sample")
register_configs()

# The packages whose code a checkpoint's config.yaml may name without trust_checkpoint_code
# (conf/ names no third-party _target_).
PROJECT_PACKAGES: tuple[str, ...] = ("omni_train", "data_pipelines")
TRUST_FLAG = "trust_checkpoint_code=true"


class UntrustedCheckpointCode(ValueError):
    """A checkpoint's config.yaml names code outside this project."""


@dataclass
class LoadedRun:
    cfg: TrainConfig
    checkpoint: Path
    denoiser: torch.nn.Module
    encoders: torch.nn.Module


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder, or the newest complete one of a run dir."""
    from omni_train.trainer import checkpoint as ckpt

    path = Path(path)
    if (path / ckpt.COMPLETE_MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            latest = ckpt.latest_checkpoint(root)
            if latest is not None:
                return latest
    raise FileNotFoundError(
        f"checkpoint={path} is neither a complete checkpoint folder nor a run dir holding "
        "one: pass RUN_DIR or RUN_DIR/checkpoints/step_N"
    )


def config_targets(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a plain config container."""
    found = []
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                found.append((path, value))
            else:
                found += config_targets(value, path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += config_targets(value, f"{key}.{index}")
    return found


def _in_project(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in PROJECT_PACKAGES)


def check_checkpoint_targets(saved: Any, config_file: Path) -> None:
    """Raise UntrustedCheckpointCode unless every non-empty ``_target_`` in ``saved`` names
    this project's code. Other targets are refused before anything is imported; a project path
    is then resolved (importing project modules only) and must name an object defined in the
    project, so ``omni_train.sample.torch.load`` is refused as well."""
    from hydra.utils import get_object

    for key, target in config_targets(OmegaConf.to_container(saved, resolve=True)):
        if target in ("", None):
            continue
        named = str(target)
        if _in_project(named):
            try:
                defined_in = getattr(get_object(named), "__module__", None) or ""
            except Exception:  # noqa: BLE001 - unresolvable: building the part reports it
                continue
            if _in_project(defined_in):
                continue
            named = f"{target} (defined in {defined_in or 'an unknown module'})"
        raise UntrustedCheckpointCode(
            f"{config_file}: {key}={named!r} is not code of this project "
            f"({', '.join(p + '.*' for p in PROJECT_PACKAGES)}), and loading the checkpoint "
            f"would import and call it. If you trust this run dir, pass {TRUST_FLAG}"
        )


def read_run_config(folder: Path, trust_checkpoint_code: bool = False) -> TrainConfig:
    """The TrainConfig of a checkpoint folder, its ``_target_`` entries checked unless
    ``trust_checkpoint_code``."""
    config_file = folder / "config.yaml"
    saved = OmegaConf.load(config_file)
    if not trust_checkpoint_code:
        check_checkpoint_targets(saved, config_file)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))


def load_run(
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = False,
    trust_checkpoint_code: bool = False,
) -> LoadedRun:
    """Rebuild the denoiser and frozen encoders of a checkpoint from its exported weights.

    The ``_target_`` entries of its config.yaml must name this project's code unless
    ``trust_checkpoint_code`` (UntrustedCheckpointCode otherwise)."""
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.models.weights import load_strict
    from omni_train.trainer.ema import EMA_FILE
    from omni_train.trainer.weights import DENOISER_FILE, FROZEN_FILE

    folder = resolve_checkpoint(checkpoint)
    cfg = read_run_config(folder, trust_checkpoint_code)
    encoders = build_frozen_encoders(cfg.model)
    if (folder / FROZEN_FILE).is_file():
        load_strict(encoders, folder / FROZEN_FILE, what="frozen encoders")
    denoiser = build_denoiser(cfg.model)
    weights = folder / (EMA_FILE if use_ema else DENOISER_FILE)
    if use_ema and not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has no {EMA_FILE}: the run trained without trainer.ema.enabled=true; "
            "sample without use_ema=true"
        )
    load_strict(denoiser, weights, what="EMA denoiser" if use_ema else "denoiser")
    return LoadedRun(cfg, folder, denoiser.to(device).eval(), encoders.to(device).eval())


def output_frames(seconds: float, audio_seconds: float, fps: float, segment_frames: int) -> int:
    """Frames to generate: the requested (or the audio's) length, at least two segments."""
    wanted = round((seconds if seconds > 0 else audio_seconds) * fps)
    return max(wanted, 2 * segment_frames - 5)


def run_sampling(cfg: SampleConfig) -> Path:
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
        )
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
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
