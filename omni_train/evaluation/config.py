"""What `python -m omni_train.evaluate` runs: checkpoint, held-out clips, task, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from omni_train.contracts import TASK_CONDITIONS
from omni_train.evaluation.suite import CLIP_METRICS, SET_METRICS, MetricsConfig

WEIGHT_KEYS: tuple[str, ...] = (
    "identity_weights",
    "syncnet_weights",
    "inception_weights",
    "i3d_weights",
)


@dataclass
class EvaluateConfig:
    # A run dir (its newest complete checkpoint) or one step folder run_dir/checkpoints/step_N.
    checkpoint: str = MISSING
    # Held-out shards (glob / brace pattern / comma list), read with the run's data config.
    shards: str = MISSING
    # Output folder; empty = CHECKPOINT_RUN_DIR/eval (where `omni_train.report` looks).
    out: str = ""
    # Clips to evaluate: the first N usable ones in key order (skipped clips are listed).
    num_clips: int = 8
    # Conditions the model gets: text (text + reference), audio (+ audio), pose (+ pose).
    task: str = "audio"
    # Generation length in seconds; 0 = each clip's own length. Longer than a clip: fidelity
    # is scored on the overlap, drift over the whole generation (audio past the clip's end is
    # silence, keypoints past it are absent).
    seconds: float = 0.0
    # Index, in the clip at the run's fps, of the frame given as the reference image.
    reference_frame: int = 0
    # Overrides the run's diffusion.sampling_steps when > 0.
    sampling_steps: int = 0
    seed: int = 0
    # Generate with the EMA weights (ema.safetensors).
    use_ema: bool = False
    # Let the checkpoint's config.yaml name code outside omni_train / data_pipelines as a
    # _target_ (imported and called to build the model): only for run dirs you trust.
    trust_checkpoint_code: bool = False
    # Under torchrun: ranks that split each denoiser call's latent frames (as in
    # omni_train.sample); the guidance passes go to the WORLD_SIZE / sequence_parallel groups.
    sequence_parallel: int = 1
    # Where the model runs: "" = cuda when available, else cpu; or e.g. "cpu", "cuda:1".
    device: str = ""
    # Write the side-by-side mp4 of every clip (real | static reference | generated).
    grid: bool = True
    # An offline W&B run (job_type "eval") in OUT/wandb with the per-clip rows and the summary.
    wandb: bool = True
    wandb_project: str = "omni-train"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> None:
        """Raise ValueError naming the key and the fix; runs before any model is loaded."""
        if not str(self.checkpoint).strip():
            raise ValueError("checkpoint is empty: pass checkpoint=RUN_DIR or a step folder")
        if not str(self.shards).strip():
            raise ValueError("shards is empty: pass shards='DIR/shards/*.tar' (held-out clips)")
        if self.num_clips < 1:
            raise ValueError(f"num_clips={self.num_clips} must be at least 1")
        if self.task not in TASK_CONDITIONS:
            raise ValueError(f"task={self.task!r}: use one of {sorted(TASK_CONDITIONS)}")
        if self.seconds < 0:
            raise ValueError(f"seconds={self.seconds} must be 0 (the clip's length) or more")
        if self.reference_frame < 0:
            raise ValueError(f"reference_frame={self.reference_frame} must be 0 or more")
        if self.sampling_steps < 0:
            raise ValueError(f"sampling_steps={self.sampling_steps} must be 0 (the run's) or more")
        known = sorted(set(CLIP_METRICS) | set(SET_METRICS))
        unknown = sorted(set(self.metrics.enabled or []) - set(known))
        if unknown:
            raise ValueError(f"metrics.enabled: unknown metric(s) {unknown}; known: {known}")
        for key in WEIGHT_KEYS:
            path = getattr(self.metrics, key, "")
            if path and not Path(path).exists():
                raise ValueError(
                    f"metrics.{key}={path} does not exist: give the weights' path, or leave "
                    "it empty to report that metric as not measured"
                )
