"""Flow-matching and sampling configuration (the paper fixes flow matching, not the numbers)."""

from __future__ import annotations

from dataclasses import dataclass

TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal")


@dataclass
class DiffusionConfig:
    # How training draws t in (0, 1), t = 1 being pure noise.
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # SD3-style shift applied to sampled and inference timesteps: t' = s t / (1 + (s - 1) t).
    shift: float = 1.0
    sampling_steps: int = 25
    # Classifier-free guidance on text and audio only (paper §3.4), annealed linearly from the
    # start scale at the first step to the end scale at the last.
    cfg_text: float = 3.0
    cfg_text_end: float = 1.5
    cfg_audio: float = 3.0
    cfg_audio_end: float = 1.5
    # Pixel frames carried from one segment to the next (paper §3.4: 5).
    motion_frames: int = 5
