"""Euler sampling with annealed text/audio guidance, and segment-wise long-video generation.

A task names the conditions a generation uses (paper §3.4: turning a condition on turns on
every weaker one): ``text`` = text + reference, ``audio`` = + audio, ``pose`` = + pose.

Guidance (paper §3.4) acts on text and audio only:
    v = v_uncond + s_text (v_text - v_uncond) + s_audio (v_text_audio - v_text)
where "uncond" drops text and audio (reference and pose stay on). Both scales fall linearly
from their start value at the first step to their end value at the last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from omni_train.contracts import CONDITIONS, TASK_CONDITIONS, latent_frames
from omni_train.data.pose import keypoint_heatmaps
from omni_train.diffusion.config import DiffusionConfig
from omni_train.diffusion.flow import shift_timesteps

if TYPE_CHECKING:
    from omni_train.diffusion.cfg_parallel import CFGParallel
    from omni_train.models.sequence_parallel import SequenceParallel

AUDIO_SAMPLE_RATE = 16_000


# (x, t, text_on, audio_on) -> velocity; all batched along dim 0.
GuidedModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    text_start: float = 1.0
    text_end: float = 1.0
    audio_start: float = 1.0
    audio_end: float = 1.0

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Guidance:
        return cls(cfg.cfg_text, cfg.cfg_text_end, cfg.cfg_audio, cfg.cfg_audio_end)


def guidance_schedule(guidance: Guidance, steps: int) -> list[tuple[float, float]]:
    """(s_text, s_audio) for each step, linear from the start to the end scales."""

    def ramp(start: float, end: float, i: int) -> float:
        return start if steps == 1 else start + (end - start) * i / (steps - 1)

    return [
        (
            ramp(guidance.text_start, guidance.text_end, i),
            ramp(guidance.audio_start, guidance.audio_end, i),
        )
        for i in range(steps)
    ]


def inference_timesteps(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) times from 1 (noise) down to 0 (data) on the shifted schedule."""
    if steps < 1:
        raise ValueError(f"sampling steps={steps} must be >= 1")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


# (x, t, text_scale, audio_scale) -> guided velocity: guided_velocity or a parallel one.
VelocityFn = Callable[[GuidedModelFn, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def guidance_passes(text_scale: float, audio_scale: float) -> list[tuple[bool, bool]]:
    """(text_on, audio_on) of each model pass a guided step needs, in combine_passes' order:
    one conditional pass at unit scales, else unconditional, text, text + audio."""
    if text_scale == 1.0 and audio_scale == 1.0:
        return [(True, True)]
    return [(False, False), (True, False), (True, True)]


def combine_passes(
    velocities: list[torch.Tensor], text_scale: float, audio_scale: float
) -> torch.Tensor:
    """The guided velocity from the passes of guidance_passes(text_scale, audio_scale)."""
    if len(velocities) == 1:
        return velocities[0]
    v_uncond, v_text, v_text_audio = velocities
    return v_uncond + text_scale * (v_text - v_uncond) + audio_scale * (v_text_audio - v_text)


def guided_velocity(
    model_fn: GuidedModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    text_scale: float,
    audio_scale: float,
    batched: bool = True,
) -> torch.Tensor:
    batch = x.shape[0]
    passes = [
        (torch.full((batch,), text, device=x.device), torch.full((batch,), audio, device=x.device))
        for text, audio in guidance_passes(text_scale, audio_scale)
    ]
    if len(passes) == 1:
        return model_fn(x, t, *passes[0])
    if batched:
        text_on = torch.cat([p[0] for p in passes])
        audio_on = torch.cat([p[1] for p in passes])
        velocities = model_fn(x.repeat(3, 1, 1, 1, 1), t.repeat(3), text_on, audio_on).chunk(3)
    else:
        velocities = [model_fn(x, t, *p) for p in passes]
    return combine_passes(list(velocities), text_scale, audio_scale)


def euler_sample(
    model_fn: GuidedModelFn,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    guidance: Guidance,
    motion_latents: torch.Tensor | None = None,
    batched: bool = True,
    velocity: VelocityFn | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (``noise``, (B, C, L, h, w)) to t = 0.

    ``motion_latents`` (B, C, m, h, w), if given, overwrite the first m frames before every
    model call and in the result, so they stay clean throughout. ``velocity`` replaces
    guided_velocity (e.g. CFGParallel.velocity, its branches on several ranks).
    """
    times = inference_timesteps(steps, shift)
    scales = guidance_schedule(guidance, steps)
    x = noise
    for i in range(steps):
        x = _with_motion(x, motion_latents)
        t = torch.full((x.shape[0],), float(times[i]), dtype=x.dtype, device=x.device)
        if velocity is None:
            v = guided_velocity(model_fn, x, t, *scales[i], batched=batched)
        else:
            v = velocity(model_fn, x, t, *scales[i])
        x = x + float(times[i + 1] - times[i]) * v
    return _with_motion(x, motion_latents)


def _with_motion(x: torch.Tensor, motion: torch.Tensor | None) -> torch.Tensor:
    if motion is None:
        return x
    return torch.cat([motion.to(x.dtype), x[:, :, motion.shape[2] :]], dim=2)


def denoiser_model_fn(
    denoiser: torch.nn.Module,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    ref_latents: torch.Tensor,
    audio_features: torch.Tensor | None,
    pose_heatmaps: torch.Tensor | None,
    active: dict[str, torch.Tensor],
    num_motion_latents: int = 0,
    sequence_parallel: SequenceParallel | None = None,
) -> GuidedModelFn:
    """Wrap an OmniDenoiser as a GuidedModelFn; conditions are repeated to the call's batch and
    the text/audio flags are ANDed with ``active``. With ``sequence_parallel`` the denoiser
    returns the velocity of this rank's frames only."""
    parallel = {} if sequence_parallel is None else {"sequence_parallel": sequence_parallel}

    def repeat(value: Any, times: int) -> Any:
        if value is None or times == 1:
            return value
        return value.repeat(times, *([1] * (value.dim() - 1)))

    def model_fn(x, t, text_on, audio_on):
        times = x.shape[0] // text.shape[0]
        flags = {name: repeat(flag, times) for name, flag in active.items()}
        flags["text"] = flags["text"] & text_on
        flags["audio"] = flags["audio"] & audio_on
        return denoiser(
            x,
            t,
            repeat(text, times),
            repeat(text_mask, times),
            repeat(ref_latents, times),
            repeat(audio_features, times),
            repeat(pose_heatmaps, times),
            flags,
            num_motion_latents=num_motion_latents,
            **parallel,
        )

    return model_fn


def segment_starts(total_frames: int, segment_frames: int, motion_frames: int) -> list[int]:
    """First pixel frame of each segment; later segments overlap the previous by motion_frames."""
    if segment_frames <= motion_frames:
        raise ValueError(
            f"segment_frames={segment_frames} must exceed motion_frames={motion_frames}"
        )
    starts = [0]
    while starts[-1] + segment_frames < total_frames:
        starts.append(starts[-1] + segment_frames - motion_frames)
    return starts


def audio_slice(
    waveform: torch.Tensor, start: int, frames: int, fps: float, rate: int
) -> torch.Tensor:
    """The samples under pixel frames [start, start + frames), zero-padded past the end."""
    first = round(start * rate / fps)
    length = round(frames * rate / fps)
    piece = waveform[first : first + length]
    return torch.nn.functional.pad(piece, (0, length - piece.shape[0]))


def task_flags(task: str, has_caption: bool, device: torch.device | str) -> dict[str, torch.Tensor]:
    """(1,) bool flag per condition for ``task``; an empty caption leaves text off."""
    if task not in TASK_CONDITIONS:
        raise ValueError(f"task={task!r}: use one of {sorted(TASK_CONDITIONS)}")
    on = TASK_CONDITIONS[task]
    flags = {name: name in on for name in CONDITIONS}
    flags["text"] = flags["text"] and has_caption
    return {name: torch.tensor([value], device=device) for name, value in flags.items()}


def segment_heatmaps(
    keypoints: torch.Tensor, start: int, frames: int, height: int, width: int, sigma: float
) -> torch.Tensor:
    """(1, J, frames, H, W) heatmaps of keypoints (T, J, 3) for pixel frames [start, start +
    frames); frames past the end of ``keypoints`` have no joints (all-zero maps)."""
    piece = keypoints[start : start + frames]
    missing = frames - piece.shape[0]
    if missing > 0:
        piece = torch.cat([piece, piece.new_zeros(missing, *piece.shape[1:])])
    return keypoint_heatmaps(piece.float(), height, width, sigma).permute(1, 0, 2, 3)[None]


@torch.no_grad()
def generate_long_video(
    denoiser: torch.nn.Module,
    encoders: Any,
    ref_image: torch.Tensor,
    audio: torch.Tensor | None,
    caption: str,
    fps: float,
    total_frames: int,
    segment_frames: int,
    diffusion_cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
    task: str = "audio",
    keypoints: torch.Tensor | None = None,
    pose_sigma: float = 2.0,
    parallel: CFGParallel | None = None,
) -> torch.Tensor | None:
    """(1, 3, total_frames, H, W) video in [-1, 1] from a reference image, 16 kHz audio and a
    caption, segment by segment; each later segment starts from the VAE re-encoding of the
    last ``motion_frames`` frames generated so far, and those duplicates are dropped.

    ``task`` selects the conditions (TASK_CONDITIONS); ``task="pose"`` needs ``keypoints``
    (T, 17, 3), normalised to the output frame as the data loader gives them, rendered per
    segment as heatmaps of radius ``pose_sigma`` pixels (data.pose_sigma).

    With ``parallel`` every rank of its group calls this with the same inputs: each denoising
    step's guidance passes run on different ranks; rank 0's noise and motion latents are the
    ones every rank uses, and only rank 0 decodes and returns the video (the others None).
    With its ``sequence_parallel`` the ranks of each slot split every denoiser call's frames.
    """
    device = next(denoiser.parameters()).device
    if task == "pose" and keypoints is None:
        raise ValueError("task=pose needs keypoints (T, 17, 3) to render pose heatmaps")
    if task in ("audio", "pose") and audio is None:
        raise ValueError(f"task={task} needs a 16 kHz waveform")
    num_latent = latent_frames(segment_frames)
    motion_frames = diffusion_cfg.motion_frames
    num_motion = latent_frames(motion_frames)
    sequence_parallel = None if parallel is None else parallel.sequence_parallel
    if sequence_parallel is not None:
        from omni_train.diffusion.sequence_parallel_sampling import check_model

        check_model(denoiser, sequence_parallel.size, num_latent, segment_frames)
    ref_latents = encoders.encode_video(ref_image.to(device)[:, :, None])
    text, text_mask = encoders.encode_text([caption])
    # An empty caption counts as no text: the model then sees its learned null text token.
    active = task_flags(task, bool(caption.strip()), device)
    use_audio, use_pose = bool(active["audio"]), bool(active["pose"])
    height, width = ref_image.shape[-2:]
    guidance = Guidance.from_config(diffusion_cfg)
    latent_shape = (1, ref_latents.shape[1], num_latent, *ref_latents.shape[-2:])
    decodes = parallel is None or parallel.is_main
    draw_device = generator.device if generator is not None else "cpu"

    def from_main(make: Callable[[], torch.Tensor], frames: int) -> torch.Tensor:
        if parallel is None:
            return make()
        shape = (*latent_shape[:2], frames, *latent_shape[3:])
        return parallel.from_main(make, shape, ref_latents.dtype, device)

    pieces: list[torch.Tensor] = []
    video = None
    for index, start in enumerate(segment_starts(total_frames, segment_frames, motion_frames)):
        features, heatmaps = None, None
        if use_audio:
            waveform = audio_slice(audio.float(), start, segment_frames, fps, AUDIO_SAMPLE_RATE)
            features = encoders.encode_audio(waveform[None].to(device), segment_frames)
        if use_pose:
            heatmaps = segment_heatmaps(
                keypoints, start, segment_frames, height, width, pose_sigma
            ).to(device)
        motion = None
        if index > 0:
            motion = from_main(
                lambda last=video: encoders.encode_video(last[:, :, -motion_frames:]), num_motion
            )
        model_fn = denoiser_model_fn(
            denoiser,
            text,
            text_mask,
            ref_latents,
            features,
            heatmaps,
            active,
            num_motion_latents=0 if motion is None else num_motion,
            sequence_parallel=sequence_parallel,
        )
        noise = from_main(
            lambda: torch.randn(latent_shape, generator=generator, device=draw_device).to(
                device, ref_latents.dtype
            ),
            num_latent,
        )
        latents = euler_sample(
            model_fn,
            noise,
            diffusion_cfg.sampling_steps,
            diffusion_cfg.shift,
            guidance,
            motion_latents=motion,
            velocity=None if parallel is None else parallel.velocity,
        )
        if not decodes:
            continue
        segment = encoders.decode_video(latents).clamp(-1, 1)
        pieces.append(segment if index == 0 else segment[:, :, motion_frames:])
        video = torch.cat(pieces, dim=2)
    return video[:, :, :total_frames] if decodes else None
