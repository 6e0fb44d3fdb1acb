"""Omni-conditions curriculum: step -> stage -> per-sample condition masks (pure, no torch)."""

from omni_train.contracts import CONDITIONS, TIERS
from omni_train.curriculum.config import (
    CfgDropoutConfig,
    CurriculumConfig,
    StageConfig,
)
from omni_train.curriculum.schedule import (
    activation_probability,
    condition_masks,
    effective_ratio,
    motion_latents_for_step,
    source_weights_at,
    stage_at,
    tier_weight,
    validate_curriculum,
)
from omni_train.curriculum.stats import CurriculumMeter, StageTotals, step_counts, step_metrics

__all__ = [
    "CONDITIONS",
    "TIERS",
    "CfgDropoutConfig",
    "CurriculumConfig",
    "StageConfig",
    "CurriculumMeter",
    "StageTotals",
    "activation_probability",
    "source_weights_at",
    "condition_masks",
    "effective_ratio",
    "motion_latents_for_step",
    "stage_at",
    "step_counts",
    "step_metrics",
    "tier_weight",
    "validate_curriculum",
]
