"""Curriculum configuration: the paper's three stages are the default.

The paper fixes the order (text+ref -> +audio -> +pose) and the principle that stronger
conditions train at lower ratios; it does not publish the ratios, stage lengths, ramps or
dropout rates. The numbers below are the project's defaults and are ablation knobs, e.g.
``curriculum.stages.1.ratios.audio=0.1``.

How one sample's condition c is decided at step s (stage k in force):

    p = ratio_k[c] * tier_weight_k[c][tier of the sample for c]    (tier "none": p = 0)
    during a ramp, p moves linearly from stage k-1's p to stage k's p
    active = draw < p, then a CFG dropout draw may switch text / audio off again
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_train.contracts import CONDITIONS


def _no_ramps() -> dict[str, int]:
    return {cond: 0 for cond in CONDITIONS}


@dataclass
class StageConfig:
    name: str = "stage"
    # First optimizer step (0-based) of this stage; a stage lasts until the next one starts.
    start_step: int = 0
    # Probability that a condition is active for a sample whose tier makes it eligible.
    ratios: dict[str, float] = field(
        default_factory=lambda: {"text": 1.0, "ref": 1.0, "audio": 0.0, "pose": 0.0}
    )
    # Steps over which a condition's activation probability moves linearly from the previous
    # stage's value to this stage's, starting at start_step (0: switch at once).
    ramp_steps: dict[str, int] = field(default_factory=_no_ramps)
    # The stage's data mix: per condition, the weight in [0, 1] of each quality tier
    # (strong, weak) for that condition's task; it multiplies the ratio. A condition not
    # listed here uses curriculum.eligible_tiers (weight 1 for a listed tier, 0 otherwise).
    # A tier left out of a listed condition has weight 0. E.g. {pose: {strong: 1.0,
    # weak: 0.3}} also trains pose on weak clips, less often.
    tier_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per data source (data.sources names), its sampling weight during this stage; a source
    # not listed keeps its data.sources weight.
    source_weights: dict[str, float] = field(default_factory=dict)


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig("text_ref", 0, {"text": 0.9, "ref": 0.7, "audio": 0.0, "pose": 0.0}),
        StageConfig("audio", 20_000, {"text": 0.9, "ref": 0.7, "audio": 0.5, "pose": 0.0}),
        StageConfig("pose", 40_000, {"text": 0.9, "ref": 0.7, "audio": 0.5, "pose": 0.25}),
    ]


def _default_eligible_tiers() -> dict[str, list[str]]:
    # Principle 1: clips too poor for audio/pose ("weak"/"none") still train text and ref.
    return {
        "text": ["strong", "weak"],
        "ref": ["strong", "weak"],
        "audio": ["strong"],
        "pose": ["strong"],
    }


@dataclass
class CfgDropoutConfig:
    """Extra condition dropout so the sampler's guidance branches are trained (paper §3.4).

    Applied after the ratios: an active condition is switched off with these probabilities.
    Ratios below 1 already give condition-free samples; these make sure of it when a ratio
    is 1. ``text_audio`` drops both at once (the sampler's unconditional branch).
    """

    text: float = 0.0
    audio: float = 0.0
    text_audio: float = 0.0


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=_default_stages)
    # Which quality tiers of a sample may activate each condition. "none" is never eligible.
    eligible_tiers: dict[str, list[str]] = field(default_factory=_default_eligible_tiers)
    # Share of steps whose batch is trained as a continuation segment: the clip's first
    # latent frames are given clean as motion frames (paper §3.4) and excluded from the loss.
    motion_frame_ratio: float = 0.25
    cfg_dropout: CfgDropoutConfig = field(default_factory=CfgDropoutConfig)
