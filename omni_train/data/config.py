"""Data loading configuration (defaults live here once)."""

from __future__ import annotations

from dataclasses import dataclass, field

WORKER_START_METHODS: tuple[str, ...] = ("", "fork", "spawn", "forkserver")


@dataclass
class DataConfig:
    # Shard files: a glob, or a comma-separated list of globs / brace patterns
    # (e.g. "out/shards/shard-{000000..000009}.tar,extra/*.tar").
    shards: str = ""
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

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix when a value cannot work."""
        if not self.shards.strip():
            raise ValueError("data.shards is empty: pass data.shards='DIR/shards/*.tar'")
        if len(self.resolution) != 2 or min(self.resolution) < 1:
            raise ValueError(
                f"data.resolution={list(self.resolution)}: give [height, width], both positive"
            )
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
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
        if self.pose_sigma <= 0:
            raise ValueError(f"data.pose_sigma={self.pose_sigma} must be positive")
        if self.worker_start_method not in WORKER_START_METHODS:
            raise ValueError(
                f"data.worker_start_method={self.worker_start_method!r}: use one of "
                f"{WORKER_START_METHODS}"
            )

    @property
    def audio_samples(self) -> int:
        """Waveform samples covering one window of ``num_frames`` frames at ``fps``."""
        return round(self.num_frames / self.fps * self.audio_sample_rate)
