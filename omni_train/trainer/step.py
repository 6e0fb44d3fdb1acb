"""One micro-batch: frozen encoders -> condition masks applied -> flow-matching loss.

Kept apart from the Trainer so that the loss of a batch is a plain function of its inputs
(model, batch, masks, seeded generator) and can be tested without a process group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from omni_train.contracts import CONDITIONS, SPATIAL_STRIDE, pixel_frames
from omni_train.data.batch import Batch
from omni_train.data.pose import keypoint_heatmaps
from omni_train.diffusion.config import DiffusionConfig
from omni_train.diffusion.flow import sample_timesteps
from omni_train.models.sequence_parallel import SequenceParallel, sharded_flow_matching_loss

# A sample's task is named after its strongest active condition (paper §3.3 order).
TASKS: tuple[str, ...] = ("uncond", *CONDITIONS)


def task_of(active: Mapping[str, bool]) -> str:
    strongest = "uncond"
    for cond in CONDITIONS:
        if active[cond]:
            strongest = cond
    return strongest


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for the noise and timesteps of one micro-batch on one rank."""
    digest = hashlib.sha1(f"{seed}:{step}:{rank}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class StepResult:
    """Per-sample losses and condition activity of one or more micro-batches on one rank."""

    loss: torch.Tensor | None
    per_sample: torch.Tensor
    active: dict[str, torch.Tensor]
    num_motion_latents: int
    corrupt_skipped: int = 0  # the loader's running count of skipped samples (this rank)
    tasks: list[str] = field(default_factory=list)
    # Per sample: the text positions the model ran (its batch's padded caption length).
    text_tokens: list[int] = field(default_factory=list)

    def detach(self) -> StepResult:
        return StepResult(
            loss=None,
            per_sample=self.per_sample.detach().float(),
            active={k: v.detach() for k, v in self.active.items()},
            num_motion_latents=self.num_motion_latents,
            corrupt_skipped=self.corrupt_skipped,
            tasks=list(self.tasks),
            text_tokens=list(self.text_tokens),
        )

    @staticmethod
    def merge(results: list[StepResult]) -> StepResult:
        return StepResult(
            loss=None,
            per_sample=torch.cat([r.per_sample for r in results]),
            active={c: torch.cat([r.active[c] for r in results]) for c in CONDITIONS},
            num_motion_latents=results[-1].num_motion_latents,
            corrupt_skipped=results[-1].corrupt_skipped,
            tasks=[t for r in results for t in r.tasks],
            text_tokens=[n for r in results for n in r.text_tokens],
        )

    def totals(self, flops: float = 0.0) -> StepTotals:
        """This rank's sums for the metrics row; ``flops``: the model FLOPs that ran here."""
        task_sums, task_counts = {}, {}
        for task in TASKS:
            chosen = [i for i, t in enumerate(self.tasks) if t == task]
            task_sums[task] = float(self.per_sample[chosen].sum()) if chosen else 0.0
            task_counts[task] = float(len(chosen))
        return StepTotals(
            loss_sum=float(self.per_sample.sum()),
            count=float(self.per_sample.numel()),
            active={c: float(self.active[c].sum()) for c in CONDITIONS},
            task_loss_sums=task_sums,
            task_counts=task_counts,
            corrupt_skipped=float(self.corrupt_skipped),
            flops=float(flops),
            text_tokens=float(sum(self.text_tokens)),
        )


@dataclass
class StepTotals:
    """The sums of one step on one rank (or, after ``from_tensor`` of the all-reduced
    ``to_tensor()``, over all ranks) that the metrics row is built from."""

    loss_sum: float
    count: float
    active: dict[str, float]  # samples with each condition on
    task_loss_sums: dict[str, float]
    task_counts: dict[str, float]
    corrupt_skipped: float
    flops: float  # model FLOPs that ran
    text_tokens: float  # text positions that ran

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        """One float64 vector, so one all-reduce sums every field."""
        values = [self.loss_sum, self.count]
        values += [self.active[c] for c in CONDITIONS]
        values += [self.task_loss_sums[t] for t in TASKS]
        values += [self.task_counts[t] for t in TASKS]
        values += [self.corrupt_skipped, self.flops, self.text_tokens]
        return torch.tensor(values, dtype=torch.float64, device=device)

    @staticmethod
    def from_tensor(vector: torch.Tensor) -> StepTotals:
        values = vector.tolist()
        expected = 2 + len(CONDITIONS) + 2 * len(TASKS) + 3
        if len(values) != expected:
            raise ValueError(f"a step totals vector has {expected} values, got {len(values)}")
        conditions, tasks = len(CONDITIONS), len(TASKS)
        sums_at, counts_at, rest_at = (
            2 + conditions,
            2 + conditions + tasks,
            2 + conditions + 2 * tasks,
        )
        return StepTotals(
            loss_sum=values[0],
            count=values[1],
            active=dict(zip(CONDITIONS, values[2:sums_at], strict=True)),
            task_loss_sums=dict(zip(TASKS, values[sums_at:counts_at], strict=True)),
            task_counts=dict(zip(TASKS, values[counts_at:rest_at], strict=True)),
            corrupt_skipped=values[rest_at],
            flops=values[rest_at + 1],
            text_tokens=values[rest_at + 2],
        )

    def row(self) -> dict[str, float | int]:
        """The loss, batch size, condition and task counts and skipped samples of a row."""
        row: dict[str, float | int] = {
            "loss": self.loss_sum / max(self.count, 1.0),
            "batch_size": int(self.count),
        }
        for cond in CONDITIONS:
            row[f"active_{cond}"] = int(self.active[cond])
        for task in TASKS:
            task_count = self.task_counts[task]
            row[f"count_task_{task}"] = int(task_count)
            if task_count:
                row[f"loss_task_{task}"] = self.task_loss_sums[task] / task_count
        row["corrupt_skipped"] = int(self.corrupt_skipped)
        return row


def pose_heatmaps(keypoints: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """(B, T, J, 3) keypoints -> (B, J, T, H, W) heatmaps for the pose guider."""
    return keypoint_heatmaps(keypoints, height, width, sigma).permute(0, 2, 1, 3, 4)


@dataclass
class ModelInputs:
    """A batch's model inputs from the frozen encoders (or precomputed in the shards)."""

    x0: torch.Tensor
    ref_latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    audio: torch.Tensor
    heatmaps: torch.Tensor

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
        """A copy with ``fn`` applied to every tensor."""
        return ModelInputs(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def conditions(self) -> dict[str, torch.Tensor]:
        """The condition keyword arguments of flow_matching_loss (and of the denoiser)."""
        return {
            "text": self.text,
            "text_mask": self.text_mask,
            "ref_latents": self.ref_latents,
            "audio_features": self.audio,
            "pose_heatmaps": self.heatmaps,
        }


def _latents(encoders, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and reference latents: precomputed ones (data.precomputed) or VAE-encoded."""
    if batch.precomputed:
        return batch.latents, batch.ref_latents
    return encoders.encode_video(batch.video), encoders.encode_video(batch.ref[:, :, None])


def model_inputs(
    encoders,
    batch: Batch,
    device: torch.device,
    pose_sigma: float,
    audio_on: bool,
    pose_on: bool,
) -> ModelInputs:
    """The inputs of the flow-matching loss for a collated batch (training and validation).

    ``audio_on`` / ``pose_on``: whether any sample of the batch has that condition on; when
    none has, audio is not encoded (zeros) and keypoints are zeroed, since the model sees its
    learned nulls for them anyway.
    """
    batch = batch.to(device)
    x0, ref_latents = _latents(encoders, batch)
    batch_size, _, latent_count, latent_h, latent_w = x0.shape
    num_frames = pixel_frames(latent_count)
    height, width = latent_h * SPATIAL_STRIDE, latent_w * SPATIAL_STRIDE
    if batch.text_embeddings is not None:  # precomputed by data_pipelines.encode
        text, text_mask = batch.text_embeddings, batch.text_mask
    else:
        text, text_mask = encoders.encode_text(list(batch.captions))
    # Every module runs on every rank even when a condition is off for the whole micro-batch
    # (inactive samples see learned nulls): ZeRO's gradient reduction expects the same
    # parameters to produce gradients everywhere.
    if batch.audio_features is not None:
        audio = batch.audio_features
    elif audio_on:
        audio = encoders.encode_audio(batch.audio, num_frames)
    else:
        audio = torch.zeros(batch_size, num_frames, encoders.audio.dim, device=device)
    keypoints = batch.keypoints
    if not pose_on:
        keypoints = torch.zeros_like(keypoints)
    heatmaps = pose_heatmaps(keypoints, height, width, pose_sigma)
    return ModelInputs(x0, ref_latents, text, text_mask, audio, heatmaps)


def compute_loss(
    model: Callable[..., torch.Tensor],
    encoders,
    batch: Batch,
    masks: Mapping[str, np.ndarray],
    num_motion_latents: int,
    diffusion_cfg: DiffusionConfig,
    generator: torch.Generator,
    device: torch.device,
    pose_sigma: float = 2.0,
    sequence_parallel: SequenceParallel | None = None,
) -> StepResult:
    """Flow-matching loss of one micro-batch with the curriculum's per-sample masks applied.

    Conditions that are off for a sample reach the model as its learned nulls (the model
    decides how); conditions off for the whole batch are not encoded. Under
    ``sequence_parallel`` every rank of the group passes the same batch, masks and generator
    seed; the model runs on this rank's frames and the per-sample loss is the whole clip's.
    """
    active = {c: torch.as_tensor(np.asarray(masks[c]), device=device) for c in CONDITIONS}
    # A clip without an audio track cannot train audio, whatever its tag says.
    active["audio"] = active["audio"] & batch.has_audio.to(device)

    inputs = model_inputs(
        encoders,
        batch,
        device,
        pose_sigma,
        audio_on=bool(active["audio"].any()),
        pose_on=bool(active["pose"].any()),
    )
    x0 = inputs.x0
    batch_size = x0.shape[0]
    t = sample_timesteps(diffusion_cfg, batch_size, generator, device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    per_sample = sharded_flow_matching_loss(
        model,
        x0,
        noise,
        t,
        num_motion_latents,
        sequence_parallel=sequence_parallel,
        active=active,
        **inputs.conditions(),
    )
    flags = {c: active[c].cpu().numpy() for c in CONDITIONS}
    tasks = [task_of({c: bool(flags[c][i]) for c in CONDITIONS}) for i in range(batch_size)]
    return StepResult(
        loss=per_sample.mean(),
        per_sample=per_sample,
        active=active,
        num_motion_latents=num_motion_latents,
        tasks=tasks,
        text_tokens=[inputs.text.shape[1]] * batch_size,
    )
