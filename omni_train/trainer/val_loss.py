"""The validation loss: the flow-matching loss of fixed held-out clips, at fixed timesteps,
with fixed noise, so that two evaluations of the same weights give the same numbers.

- Clips: the first ``trainer.val_loss.num_clips`` samples of data.val_shards (shard paths
  sorted, then tar order), or, when it is empty, of the training sources' held-out share
  (data.val_holdout). Only tar headers are read to choose them.
- Timesteps: K points at the quantiles (k + 0.5) / K of the training timestep distribution
  (diffusion.timestep_sampling and shift), so the mean over them is a stratified estimate of
  the expected training loss. No motion frames.
- Noise: drawn per (clip key, k) from trainer.val_loss.noise_seed, on the CPU.
- Tasks, each with fixed condition masks (a task turns on its condition and every weaker one,
  each only where the clip's tag for it is strong or weak; audio also needs a track):
  "text" (text + ref) on every clip, "audio" (+ audio) on clips whose audio is usable,
  "pose" (+ audio where usable, + pose) on clips whose pose is usable.
- One forward per (clip, task): the K timesteps of that clip in one batch, whatever the world
  size. Clips are dealt out to ranks (clip i to rank i % world size); the per-clip losses are
  gathered and reduced on the main rank in clip order, in float64. Under ZeRO-3 every rank
  runs the same number of forwards (parameters are gathered collectively), padding with
  repeats whose results are dropped.

The frozen encoders' outputs of a clip (latents, text, audio features, pose heatmaps) are
computed once and cached on the CPU; an evaluation runs only the denoiser.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from omni_train.contracts import CONDITIONS, TASK_CONDITIONS, TRAINABLE_TIERS, key_hash
from omni_train.data.batch import collate
from omni_train.data.config import DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.latents import decode_latent_sample
from omni_train.data.shards import (
    LATENT_MEMBERS,
    SampleRef,
    held_out,
    index_shard,
    read_sample,
    shard_list,
)
from omni_train.diffusion.config import TIMESTEP_SAMPLINGS, DiffusionConfig
from omni_train.diffusion.flow import _T_EPS, flow_matching_loss, shift_timesteps
from omni_train.trainer.config import VAL_TASKS, ValLossConfig
from omni_train.trainer.step import ModelInputs, model_inputs

log = logging.getLogger(__name__)

# The condition a task adds, and every condition it may turn on (paper §3.4: turning a
# condition on turns on every weaker one too).
TASK_CONDITION: dict[str, str] = {"text": "text", "audio": "audio", "pose": "pose"}


# ----------------------------------------------------------------------------- fixed choices
def fixed_timesteps(cfg: DiffusionConfig, count: int) -> torch.Tensor:
    """(count,) float32 timesteps at the quantiles (k + 0.5) / count of the training draw."""
    if count < 1:
        raise ValueError(f"trainer.val_loss.timesteps={count} must be at least 1")
    u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    if cfg.timestep_sampling == "uniform":
        t = u
    elif cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(u))
    else:
        raise ValueError(
            f"diffusion.timestep_sampling={cfg.timestep_sampling!r} not in {TIMESTEP_SAMPLINGS}"
        )
    return shift_timesteps(t, cfg.shift).clamp(_T_EPS, 1 - _T_EPS).float()


def noise_seed(seed: int, key: str, k: int) -> int:
    digest = hashlib.sha1(f"val:{seed}:{key}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fixed_noise(shape: Sequence[int], seed: int, key: str, count: int) -> torch.Tensor:
    """(count, *shape) float32 noise; row k depends on (seed, key, k) only."""
    rows = []
    for k in range(count):
        generator = torch.Generator().manual_seed(noise_seed(seed, key, k))
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- tasks
def usable(cond: str, quality: Mapping[str, str], has_audio: bool) -> bool:
    """Whether a clip's tag (and, for audio, its track) lets ``cond`` be on."""
    if cond == "audio" and not has_audio:
        return False
    return quality.get(cond, "none") in TRAINABLE_TIERS


def clip_tasks(quality: Mapping[str, str], has_audio: bool, tasks: Sequence[str]) -> list[str]:
    """The tasks a clip is evaluated on: "text" always, the others where their condition is
    usable."""
    return [
        task for task in tasks if task == "text" or usable(TASK_CONDITION[task], quality, has_audio)
    ]


def task_active(task: str, quality: Mapping[str, str], has_audio: bool) -> dict[str, bool]:
    """The fixed condition mask of one clip under ``task``."""
    on = TASK_CONDITIONS[task]
    return {c: c in on and usable(c, quality, has_audio) for c in CONDITIONS}


def task_tier(task: str, quality: Mapping[str, str]) -> str:
    """The tier the breakdown files an evaluation under: that of the task's own condition."""
    return quality.get(TASK_CONDITION[task], "none")


# ----------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Evaluation:
    """The K losses of one (clip, task)."""

    clip: int
    key: str
    task: str
    tier: str
    losses: tuple[float, ...]


def t_label(t: float) -> str:
    return f"{t:.3f}"


def summarize(evaluations: Sequence[Evaluation], timesteps: Sequence[float]) -> dict[str, float]:
    """The ``val/...`` metrics of a set of evaluations, reduced in clip order in float64.

    val/loss is the mean over tasks of each task's mean (every task counts the same however
    many clips it has); val/loss_TASK averages its clips and timesteps; val/loss_TASK/TIER
    splits it by the tier of the task's condition; val/loss_tT averages the tasks' means at
    timestep T; val/count_... count clips.
    """
    ordered = sorted(evaluations, key=lambda e: (e.clip, VAL_TASKS.index(e.task)))
    out: dict[str, float] = {}
    task_means: list[float] = []
    task_t_means: list[np.ndarray] = []
    for task in VAL_TASKS:
        chosen = [e for e in ordered if e.task == task]
        if not chosen:
            continue
        losses = np.asarray([e.losses for e in chosen], dtype=np.float64)
        mean = float(losses.mean())
        out[f"val/loss_{task}"] = mean
        out[f"val/count_{task}"] = len(chosen)
        task_means.append(mean)
        task_t_means.append(losses.mean(axis=0))
        for tier in dict.fromkeys(e.tier for e in chosen):
            rows = [i for i, e in enumerate(chosen) if e.tier == tier]
            out[f"val/loss_{task}/{tier}"] = float(losses[rows].mean())
            out[f"val/count_{task}/{tier}"] = len(rows)
    if not task_means:
        return out
    out["val/loss"] = float(np.mean(task_means))
    per_t = np.mean(np.stack(task_t_means), axis=0)
    for t, value in zip(timesteps, per_t, strict=True):
        out[f"val/loss_t{t_label(float(t))}"] = float(value)
    out["val/num_clips"] = len({e.clip for e in ordered})
    return out


# ----------------------------------------------------------------------------- clips
def val_source(data: DataConfig) -> str:
    """Where the validation clips come from, for messages ("" when nowhere)."""
    if data.val_shards.strip():
        return f"data.val_shards={data.val_shards!r}"
    if data.val_holdout > 0:
        return f"the data.val_holdout={data.val_holdout} share of the training shards"
    return ""


def select_val_refs(data: DataConfig, num_clips: int) -> list[SampleRef]:
    """The first ``num_clips`` validation samples (headers only, same on every rank)."""
    if data.val_shards.strip():
        shard_groups = [shard_list(data.val_shards)]
        keep: Callable[[SampleRef], bool] = lambda ref: True  # noqa: E731
    elif data.val_holdout > 0:
        shard_groups = [shard_list(source.shards) for source in data.source_list()]
        keep = lambda ref: held_out(ref.key, data.val_holdout)  # noqa: E731
    else:
        raise ValueError(
            "the validation loss needs held-out data: set data.val_shards='DIR/shards/*.tar' "
            "or data.val_holdout=0.02 (a share of the training samples)"
        )
    chosen: list[SampleRef] = []
    for shards in shard_groups:
        for shard in shards:
            for ref in index_shard(shard):
                if keep(ref):
                    chosen.append(ref)
                    if len(chosen) == num_clips:
                        return chosen
    if not chosen:
        raise ValueError(
            f"no validation sample in {val_source(data)}: raise data.val_holdout or point "
            "data.val_shards at held-out shards"
        )
    return chosen


def _key_words(key: str) -> list[int]:
    return [key_hash(key)]


def decode_val_sample(ref: SampleRef, data: DataConfig, seed: int) -> dict:
    """A validation clip's window, the same every time (its random choices seeded by key)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, *_key_words(ref.key)])
    if data.precomputed:
        return decode_latent_sample(read_sample(ref, LATENT_MEMBERS), data, rng)
    return decode_sample(read_sample(ref), data, rng)


def held_out_samples(data: DataConfig, count: int, seed: int) -> list[dict]:
    """The decoded windows of the first ``count`` validation clips (corrupt ones skipped)."""
    samples = []
    for ref in select_val_refs(data, count):
        try:
            samples.append(decode_val_sample(ref, data, seed))
        except CorruptSample as err:
            log.warning("validation sample %s skipped: %s", ref.key, err)
    return samples


@dataclass
class ClipInputs:
    """One clip's model inputs (batch of one, on the CPU) and what decides its tasks."""

    key: str
    quality: dict[str, str]
    has_audio: bool
    inputs: ModelInputs


@torch.no_grad()
def encode_clip(sample: dict, encoders, device: torch.device, pose_sigma: float) -> ClipInputs:
    """The frozen encoders' outputs for one decoded sample (raw or precomputed), prepared as
    the training step prepares a batch (omni_train.trainer.step.model_inputs)."""
    quality = {c: str(sample["quality"].get(c, "none")) for c in CONDITIONS}
    has_audio = bool(sample["has_audio"])
    inputs = model_inputs(
        encoders,
        collate([sample]),
        device,
        pose_sigma,
        audio_on=usable("audio", quality, has_audio),
        pose_on=usable("pose", quality, has_audio),
    )
    cached = inputs.apply(lambda t: t.cpu() if t.dtype == torch.bool else t.float().cpu())
    return ClipInputs(sample["key"], quality, has_audio, cached)


def _repeat(tensor: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    return tensor.to(device).expand(count, *tensor.shape[1:]).contiguous()


@torch.no_grad()
def clip_losses(
    model: Callable[..., torch.Tensor],
    clip: ClipInputs,
    task: str,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """(K,) losses of one clip under ``task``: one forward over its K timesteps."""
    count = len(timesteps)
    flags = task_active(task, clip.quality, clip.has_audio)
    active = {c: torch.full((count,), flags[c], dtype=torch.bool, device=device) for c in flags}
    inputs = clip.inputs.apply(lambda t: _repeat(t, count, device))
    return flow_matching_loss(
        model,
        inputs.x0,
        noise.to(device),
        timesteps.to(device),
        0,
        active=active,
        **inputs.conditions(),
    ).double()


# ----------------------------------------------------------------------------- EMA weights
@contextmanager
def ema_weights(module: torch.nn.Module, ema, partitioned: bool) -> Iterator[None]:
    """Put the EMA average into ``module``'s trainable weights for the block, then restore.

    ShardedEMA keeps this rank's slice of each parameter. Under ZeRO-3 that slice is the
    rank's partition and is swapped in place; a parameter whose full tensor is present (not
    partitioned, or kept gathered by ZeRO-3's persistence threshold) gets the all-gathered
    average as well.
    """
    from omni_train.trainer.ema import _local_slice, _numel, shard_bounds

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for name, param in ema.params.items():
            shadow = ema.shadow[name]
            if partitioned:
                target = _local_slice(param, ema.rank, ema.world_size)
                saved.append((target, target.clone()))
                target.copy_(shadow)
            numel = _numel(param)
            if param.data.numel() != numel:
                continue  # a released ZeRO-3 parameter: its partition is all there is
            full = shadow
            if ema.world_size > 1:
                _, length, size = shard_bounds(numel, ema.rank, ema.world_size)
                padded = torch.zeros(size, dtype=shadow.dtype, device=shadow.device)
                padded[:length] = shadow
                parts = [torch.empty_like(padded) for _ in range(ema.world_size)]
                dist.all_gather(parts, padded)
                full = torch.cat(parts)[:numel]
            saved.append((param.data, param.data.clone()))
            param.data.copy_(full.view(param.data.shape))
    try:
        yield
    finally:
        with torch.no_grad():
            for target, original in reversed(saved):
                target.copy_(original)


# ----------------------------------------------------------------------------- the evaluator
class ValLoss:
    """Computes the validation metrics every ``trainer.val_every`` steps (every rank calls)."""

    def __init__(
        self,
        cfg: ValLossConfig,
        data: DataConfig,
        diffusion: DiffusionConfig,
        encoders,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.cfg, self.data = cfg, data
        self.encoders = encoders
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timesteps = fixed_timesteps(diffusion, cfg.timesteps)
        self._clips: list[tuple[int, ClipInputs]] | None = None
        self._filler: ClipInputs | None = None
        self._corrupt: list[tuple[int, str]] = []
        self._num_refs = 0

    def prepare(self) -> None:
        """Choose, decode and encode this rank's clips (once; raises when there are none)."""
        refs = select_val_refs(self.data, self.cfg.num_clips)
        self._num_refs = len(refs)
        self._clips = []
        for index in range(self.rank, len(refs), self.world_size):
            clip = self._load(refs[index])
            if clip is None:
                self._corrupt.append((index, refs[index].key))
            else:
                self._clips.append((index, clip))
        # A rank without clips still runs forwards under ZeRO-3: it repeats the first clip.
        if not self._clips:
            for ref in refs:
                self._filler = self._load(ref)
                if self._filler is not None:
                    break

    def _load(self, ref: SampleRef) -> ClipInputs | None:
        try:
            sample = decode_val_sample(ref, self.data, self.cfg.noise_seed)
        except CorruptSample as err:
            log.warning("validation sample %s skipped: %s", ref.key, err)
            return None
        return encode_clip(sample, self.encoders, self.device, self.data.pose_sigma)

    def _noise(self, clip: ClipInputs) -> torch.Tensor:
        return fixed_noise(
            clip.inputs.x0.shape[1:], self.cfg.noise_seed, clip.key, self.cfg.timesteps
        )

    def local_evaluations(
        self, model: Callable[..., torch.Tensor], forwards: int | None = None
    ) -> list[Evaluation]:
        """This rank's evaluations; ``forwards`` pads to that many model calls (ZeRO-3)."""
        if self._clips is None:
            self.prepare()
        evaluations = []
        calls = 0
        for index, clip in self._clips:
            noise = self._noise(clip)
            for task in clip_tasks(clip.quality, clip.has_audio, self.cfg.tasks):
                losses = clip_losses(model, clip, task, self.timesteps, noise, self.device)
                calls += 1
                evaluations.append(
                    Evaluation(
                        index,
                        clip.key,
                        task,
                        task_tier(task, clip.quality),
                        tuple(float(v) for v in losses.cpu()),
                    )
                )
        filler = self._clips[0][1] if self._clips else self._filler
        while forwards is not None and calls < forwards and filler is not None:
            clip_losses(model, filler, "text", self.timesteps, self._noise(filler), self.device)
            calls += 1
        return evaluations

    def forward_count(self) -> int:
        if self._clips is None:
            self.prepare()
        return sum(len(clip_tasks(c.quality, c.has_audio, self.cfg.tasks)) for _, c in self._clips)

    @torch.no_grad()
    def run(self, engine, ema=None) -> dict[str, float]:
        """The metrics on the main rank ({} on the others). Every rank must call."""
        partitioned = bool(engine.zero_optimization_partition_weights())
        forwards = None
        if partitioned and self.world_size > 1:
            count = torch.tensor([self.forward_count()], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            forwards = int(count.item())
        module = engine.module
        was_training = module.training
        module.eval()
        try:
            if ema is not None and self.cfg.use_ema:
                with ema_weights(module, ema, partitioned):
                    mine = self.local_evaluations(engine, forwards)
            else:
                mine = self.local_evaluations(engine, forwards)
        finally:
            module.train(was_training)
        gathered: list[list[Evaluation]] = [mine]
        corrupt = list(self._corrupt)
        if self.world_size > 1:
            gathered = [None] * self.world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, (mine, corrupt))
            corrupt = [c for _, cs in gathered for c in cs]  # type: ignore[misc]
            gathered = [evs for evs, _ in gathered]  # type: ignore[misc]
        if self.rank != 0:
            return {}
        evaluations = [e for part in gathered for e in part]
        metrics = summarize(evaluations, self.timesteps.tolist())
        if corrupt:
            metrics["val/corrupt_skipped"] = len(corrupt)
        return metrics
