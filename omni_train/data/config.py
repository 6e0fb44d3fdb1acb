"""Data loading configuration (defaults live here once)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omni_train.contracts import is_causal_frame_count

WORKER_START_METHODS: tuple[str, ...] = ("", "fork", "spawn", "forkserver")
SPLIT_MODES: tuple[str, ...] = ("auto", "shard", "sample")
AUTO_BUDGET = "auto"


def parse_cost_budget(budget: str) -> float | None:
    """data.cost_budget as training FLOPs per rank batch, or None for "auto"."""
    text = str(budget).strip().lower()
    if text == AUTO_BUDGET:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"data.cost_budget={budget!r}: give training FLOPs per rank batch (e.g. 2.5e12) "
            f"or {AUTO_BUDGET!r} (the costliest bucket at its batch_size)"
        )
    return value


@dataclass
class SourceConfig:
    """One data source of a mix: its shards and its default share of the samples."""

    name: str = "main"
    shards: str = ""
    # Relative sampling weight; curriculum.stages.N.source_weights.NAME overrides it per stage.
    weight: float = 1.0


@dataclass
class BucketConfig:
    """One (resolution x length) bucket: every batch holds samples of a single bucket."""

    resolution: list[int] = field(default_factory=lambda: [64, 64])
    num_frames: int = 17
    batch_size: int = 2


@dataclass
class DataConfig:
    # Shard files: a glob, or a comma-separated list of globs / brace patterns
    # (e.g. "out/shards/shard-{000000..000009}.tar,extra/*.tar").
    shards: str = ""
    # Held-out shards (same format) for the validation loss and the VAE's reconstruction
    # metrics; never trained on.
    val_shards: str = ""
    # Share in [0, 1) of every training source's samples held out for validation, chosen by
    # a hash of the sample key (the same samples on any world size, worker count or restart)
    # and never trained on. The validation loss uses them when data.val_shards is empty.
    val_holdout: float = 0.0
    # Output (height, width): clips are resized to cover it, then center-cropped.
    resolution: list[int] = field(default_factory=lambda: [64, 64])
    # Frames per training window; the causal VAE needs 1 + 4k.
    num_frames: int = 17
    # Frame rate of the training window; clips at another rate are resampled by nearest frame.
    fps: float = 8.0
    # Samples per batch, per rank.
    batch_size: int = 2
    # DataLoader worker processes per rank; 0 decodes in the training process.
    num_workers: int = 0
    # Samples held by each consumer's shuffle buffer (1 keeps shard order).
    shuffle_buffer: int = 16
    audio_sample_rate: int = 16_000
    # Gaussian radius, in output pixels, of the heatmaps rendered from keypoints.
    pose_sigma: float = 2.0
    # Start method of worker processes: "" is the platform default.
    worker_start_method: str = ""
    # How shards are shared among the data consumers (ranks x workers): "shard" gives each
    # consumer whole shards (needs at least one shard per consumer), "sample" deals out every
    # n-th sample of all shards (works with any shard count; every consumer reads all tar
    # headers), "auto" picks "shard" when there are enough shards, else "sample".
    split: str = "auto"
    # Several sources mixed by weight (empty: the single source data.shards). Each sample
    # comes from a source drawn by weight; the draws are seeded, so a resume is exact.
    sources: list[SourceConfig] = field(default_factory=list)
    # Resolution x length buckets (empty: the single bucket resolution / num_frames /
    # batch_size). A clip goes to the bucket whose aspect ratio is nearest its own among
    # those whose window fits in it (the longest on a tie); a batch never mixes buckets.
    buckets: list[BucketConfig] = field(default_factory=list)
    # Batch size per bucket from a cost budget (omni_train/data/bucket_cost.py), so steps of
    # every bucket take a similar time: floor(cost_budget / training FLOPs of one sample of
    # the bucket), counted from the model config (tokens x width and attention's tokens^2).
    # The computed size replaces the bucket's batch_size (data.batch_size without buckets).
    batch_by_cost: bool = False
    # Training FLOPs per rank batch (e.g. "2.5e12"), or "auto": the costliest bucket's cost
    # at its configured batch_size.
    cost_budget: str = "auto"
    # Upper bound on a cost-derived batch size (0: none): cheap buckets get many samples,
    # and activation memory grows with them.
    cost_max_batch_size: int = 0
    # Every rank's n-th batch comes from the same bucket (a draw shared by all ranks), so
    # ranks do equal work at every step; off, each batch is the first bucket to fill on its
    # rank. See "Buckets in step on every rank" in omni_train/data/README.md.
    sync_buckets: bool = False
    # Read precomputed VAE latents (latents.npy, ref_latents.npy, optional audio.npy /
    # audio_features.npy) instead of decoding mp4; batches then carry latents and
    # ref_latents in place of video and ref. See omni_train/data/latents.py.
    precomputed: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix when a value cannot work."""
        if not self.shards.strip() and not self.sources:
            raise ValueError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
        if len(self.resolution) != 2 or min(self.resolution) < 1:
            raise ValueError(
                f"data.resolution={list(self.resolution)}: give [height, width], both positive"
            )
        if not is_causal_frame_count(self.num_frames):
            raise ValueError(
                f"data.num_frames={self.num_frames}: the causal VAE needs 1 + 4k frames "
                "(e.g. 9, 17 or 33)"
            )
        if self.fps <= 0:
            raise ValueError(f"data.fps={self.fps} must be positive")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be at least 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be 0 or more")
        if self.shuffle_buffer < 1:
            raise ValueError(
                f"data.shuffle_buffer={self.shuffle_buffer} must be at least 1 (1 = no shuffle)"
            )
        if self.audio_sample_rate < 1:
            raise ValueError(f"data.audio_sample_rate={self.audio_sample_rate} must be positive")
        if not 0.0 <= self.val_holdout < 1.0:
            raise ValueError(
                f"data.val_holdout={self.val_holdout}: give the held-out share in [0, 1), e.g. 0.02"
            )
        if self.pose_sigma <= 0:
            raise ValueError(f"data.pose_sigma={self.pose_sigma} must be positive")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names {names} must be unique")
        for i, source in enumerate(self.sources):
            if not source.shards.strip():
                raise ValueError(f"data.sources.{i}.shards is empty: give its shard glob")
            if source.weight < 0:
                raise ValueError(f"data.sources.{i}.weight={source.weight} must be 0 or more")
        if self.sources and not any(source.weight > 0 for source in self.sources):
            raise ValueError("data.sources: at least one weight must be positive")
        for i, bucket in enumerate(self.buckets):
            if len(bucket.resolution) != 2 or min(bucket.resolution) < 1:
                raise ValueError(f"data.buckets.{i}.resolution={list(bucket.resolution)}")
            if not is_causal_frame_count(bucket.num_frames):
                raise ValueError(
                    f"data.buckets.{i}.num_frames={bucket.num_frames}: the causal VAE needs "
                    "1 + 4k frames"
                )
            if bucket.batch_size < 1:
                raise ValueError(f"data.buckets.{i}.batch_size must be at least 1")
        if self.batch_by_cost:
            parse_cost_budget(self.cost_budget)
        if self.cost_max_batch_size < 0:
            raise ValueError(
                f"data.cost_max_batch_size={self.cost_max_batch_size} must be 0 (no cap) or more"
            )
        if self.precomputed and self.buckets:
            raise ValueError(
                "data.precomputed=true with data.buckets: precomputed windows keep the size "
                "they were encoded at; drop data.buckets (encode each bucket to its own source)"
            )
        if self.split not in SPLIT_MODES:
            raise ValueError(f"data.split={self.split!r}: use one of {SPLIT_MODES}")
        if self.worker_start_method not in WORKER_START_METHODS:
            raise ValueError(
                f"data.worker_start_method={self.worker_start_method!r}: use one of "
                f"{WORKER_START_METHODS}"
            )

    @property
    def audio_samples(self) -> int:
        """Waveform samples covering one window of ``num_frames`` frames at ``fps``."""
        return round(self.num_frames / self.fps * self.audio_sample_rate)

    def source_list(self) -> list[SourceConfig]:
        """The configured sources, or the single source made of data.shards."""
        return list(self.sources) or [SourceConfig("main", self.shards, 1.0)]

    def bucket_list(self) -> list[BucketConfig]:
        """The configured buckets, or the single one of resolution / num_frames / batch_size."""
        single = BucketConfig(list(self.resolution), self.num_frames, self.batch_size)
        return list(self.buckets) or [single]

    @property
    def mixed(self) -> bool:
        """True when batches come from several sources or buckets."""
        return bool(self.sources) or bool(self.buckets)
