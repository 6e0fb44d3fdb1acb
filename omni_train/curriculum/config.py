"""Curriculum configuration: the paper's three stages are the default.

The paper fixes the order (text+ref -> +audio -> +pose) and the principle that stronger
conditions train at lower ratios; it does not publish the ratios or stage lengths. The numbers
below are the project's defaults and are ablation knobs, e.g.
``curriculum.stages.1.ratios.audio=0.1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Weakest to strongest (paper §3.3).
CONDITIONS: tuple[str, ...] = ("text", "ref", "audio", "pose")
TIERS: tuple[str, ...] = ("strong", "weak", "none")


@dataclass
class StageConfig:
    name: str = "stage"
    # First optimizer step (0-based) of this stage; a stage lasts until the next one starts.
    start_step: int = 0
    # Probability that a condition is active for a sample whose tier makes it eligible.
    ratios: dict[str, float] = field(
        default_factory=lambda: {"text": 1.0, "ref": 1.0, "audio": 0.0, "pose": 0.0}
    )


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
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=_default_stages)
    # Which quality tiers of a sample may activate each condition. "none" is never eligible.
    eligible_tiers: dict[str, list[str]] = field(default_factory=_default_eligible_tiers)
    # Share of steps whose batch is trained as a continuation segment: the clip's first
    # latent frames are given clean as motion frames (paper §3.4) and excluded from the loss.
    motion_frame_ratio: float = 0.25
