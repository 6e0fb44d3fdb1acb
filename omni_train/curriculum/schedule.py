"""Pure scheduling functions: (config, step, sample tags, seed) -> decisions.

Randomness is derived from (seed, step, sample key), never from a rank or a global RNG, so
the same seed gives the same assignments on any world size and after any restart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from omni_train.curriculum.config import CONDITIONS, TIERS, CurriculumConfig, StageConfig


def validate_curriculum(cfg: CurriculumConfig) -> None:
    """Raise ValueError naming the offending key when the curriculum cannot be scheduled."""
    if not cfg.stages:
        raise ValueError("curriculum.stages is empty: define at least one stage")
    if cfg.stages[0].start_step != 0:
        raise ValueError(
            f"curriculum.stages.0.start_step is {cfg.stages[0].start_step}: the first stage "
            "must start at step 0"
        )
    for i, (prev, cur) in enumerate(zip(cfg.stages, cfg.stages[1:], strict=False), start=1):
        if cur.start_step <= prev.start_step:
            raise ValueError(
                f"curriculum.stages.{i}.start_step ({cur.start_step}) must be greater than "
                f"stages.{i - 1}.start_step ({prev.start_step})"
            )
    for i, stage in enumerate(cfg.stages):
        if set(stage.ratios) != set(CONDITIONS):
            raise ValueError(
                f"curriculum.stages.{i}.ratios has keys {sorted(stage.ratios)}; "
                f"expected exactly {list(CONDITIONS)}"
            )
        for cond, ratio in stage.ratios.items():
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"curriculum.stages.{i}.ratios.{cond}={ratio} is not in [0, 1]")
    if set(cfg.eligible_tiers) != set(CONDITIONS):
        raise ValueError(
            f"curriculum.eligible_tiers has keys {sorted(cfg.eligible_tiers)}; "
            f"expected exactly {list(CONDITIONS)}"
        )
    for cond, tiers in cfg.eligible_tiers.items():
        for tier in tiers:
            if tier not in TIERS or tier == "none":
                raise ValueError(
                    f"curriculum.eligible_tiers.{cond} contains {tier!r}; allowed: strong, weak "
                    "(a condition tagged 'none' is never trained)"
                )
    if not 0.0 <= cfg.motion_frame_ratio <= 1.0:
        raise ValueError(f"curriculum.motion_frame_ratio={cfg.motion_frame_ratio} not in [0, 1]")


def stage_at(cfg: CurriculumConfig, step: int) -> tuple[int, StageConfig]:
    """The (0-based index, stage) in force at optimizer step ``step``."""
    index = 0
    for i, stage in enumerate(cfg.stages):
        if step >= stage.start_step:
            index = i
    return index, cfg.stages[index]


def _key_entropy(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")


def _rng(seed: int, step: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, step, *extra])


def condition_masks(
    cfg: CurriculumConfig,
    step: int,
    keys: Sequence[str],
    qualities: Sequence[Mapping[str, str]],
    seed: int,
) -> dict[str, np.ndarray]:
    """Per-sample activation of each condition at ``step``.

    A condition is active for a sample when the sample's tier for it is eligible and a draw
    falls under the stage's ratio. A condition tagged "none" is never active.
    """
    if len(keys) != len(qualities):
        raise ValueError(f"{len(keys)} keys but {len(qualities)} quality records")
    _, stage = stage_at(cfg, step)
    masks = {cond: np.zeros(len(keys), dtype=bool) for cond in CONDITIONS}
    for i, (key, quality) in enumerate(zip(keys, qualities, strict=True)):
        draws = _rng(seed, step, _key_entropy(key)).random(len(CONDITIONS))
        for draw, cond in zip(draws, CONDITIONS, strict=True):
            tier = quality.get(cond, "none")
            eligible = tier in cfg.eligible_tiers[cond]
            masks[cond][i] = eligible and draw < stage.ratios[cond]
    return masks


def motion_latents_for_step(
    cfg: CurriculumConfig, step: int, seed: int, motion_latents: int
) -> int:
    """How many leading latent frames are clean motion frames for this step's batches."""
    draw = _rng(seed, step, 0x6D6F74).random()
    return motion_latents if draw < cfg.motion_frame_ratio else 0
