"""The structured configs that Hydra composes and validates (defaults live here once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from omni_train.curriculum.config import CurriculumConfig
from omni_train.data.config import DataConfig
from omni_train.diffusion.config import DiffusionConfig
from omni_train.models.config import ModelConfig
from omni_train.trainer.config import LoggerConfig, TrainerConfig


@dataclass
class TrainConfig:
    # Names the run in W&B (group) and in the run dir's metadata.
    experiment: str = "default"
    run_dir: str = MISSING
    seed: int = 0
    # Validate the config and the shards, print the resolved config, and exit.
    check_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SampleConfig:
    # A checkpoint folder (run_dir/checkpoints/step_N) or a run dir (its newest checkpoint).
    checkpoint: str = MISSING
    # An image (png/jpg) or a video whose first frame is used.
    ref_image: str = MISSING
    # Any file with an audio track (wav, mp3, mp4 ...); resampled to 16 kHz mono.
    audio: str = MISSING
    out: str = MISSING
    caption: str = ""
    # Length of the output; 0 means the length of the audio.
    seconds: float = 0.0
    # Frames per segment (1 + 4k); 0 means the training clip length.
    segment_frames: int = 0
    # Overrides the run's diffusion.sampling_steps when > 0.
    sampling_steps: int = 0
    # Sample with the EMA weights (ema.safetensors) of a run trained with trainer.ema.enabled.
    use_ema: bool = False
    seed: int = 0
    # Let the checkpoint's config.yaml name code outside omni_train / data_pipelines as a
    # _target_ (imported and called to build the model): only for run dirs you trust.
    trust_checkpoint_code: bool = False
    # Under torchrun: ranks that split each denoiser call's latent frames (Ulysses); the
    # guidance passes go to the WORLD_SIZE / sequence_parallel groups (CFG-parallel).
    sequence_parallel: int = 1


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train_config(overrides: Sequence[str] = ()) -> Any:
    """The TrainConfig object that `python -m omni_train.train OVERRIDES` would run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        raw = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_object(raw), OmegaConf.to_container(raw, resolve=True)
