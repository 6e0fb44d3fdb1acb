"""Omni-conditions curriculum: step -> stage -> per-sample condition masks (pure, no torch)."""

from omni_train.curriculum.config import CONDITIONS, TIERS, CurriculumConfig, StageConfig
from omni_train.curriculum.schedule import (
    condition_masks,
    motion_latents_for_step,
    stage_at,
    validate_curriculum,
)

__all__ = [
    "CONDITIONS",
    "TIERS",
    "CurriculumConfig",
    "StageConfig",
    "condition_masks",
    "motion_latents_for_step",
    "stage_at",
    "validate_curriculum",
]
