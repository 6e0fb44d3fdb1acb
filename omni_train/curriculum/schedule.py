"""Pure scheduling functions: (config, step, sample tags, seed) -> decisions.

Randomness is derived from (seed, step, sample key), never from a rank or a global RNG, so
the same seed gives the same assignments on any world size and after any restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from omni_train.contracts import CONDITIONS, TRAINABLE_TIERS, key_hash
from omni_train.curriculum.config import CurriculumConfig, StageConfig

# Conditions the CFG dropout may switch off (the sampler guides on these two only).
GUIDED: tuple[str, ...] = ("text", "audio")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is not in [0, 1]")


def _validate_stage(i: int, stage: StageConfig) -> None:
    prefix = f"curriculum.stages.{i}"
    if set(stage.ratios) != set(CONDITIONS):
        raise ValueError(
            f"{prefix}.ratios has keys {sorted(stage.ratios)}; expected exactly {list(CONDITIONS)}"
        )
    for cond, ratio in stage.ratios.items():
        _check_probability(f"{prefix}.ratios.{cond}", ratio)
    for cond, steps in stage.ramp_steps.items():
        if cond not in CONDITIONS:
            raise ValueError(f"{prefix}.ramp_steps.{cond}: not a condition; use {CONDITIONS}")
        if steps < 0:
            raise ValueError(f"{prefix}.ramp_steps.{cond}={steps} must be 0 or more")
    for name, weight in stage.source_weights.items():
        if weight < 0:
            raise ValueError(f"{prefix}.source_weights.{name}={weight} must be 0 or more")
    for cond, weights in stage.tier_weights.items():
        if cond not in CONDITIONS:
            raise ValueError(f"{prefix}.tier_weights.{cond}: not a condition; use {CONDITIONS}")
        for tier, weight in weights.items():
            if tier not in TRAINABLE_TIERS:
                raise ValueError(
                    f"{prefix}.tier_weights.{cond}.{tier}: weights are given for "
                    f"{TRAINABLE_TIERS} (a condition tagged 'none' is never trained)"
                )
            _check_probability(f"{prefix}.tier_weights.{cond}.{tier}", weight)


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
        _validate_stage(i, stage)
    if set(cfg.eligible_tiers) != set(CONDITIONS):
        raise ValueError(
            f"curriculum.eligible_tiers has keys {sorted(cfg.eligible_tiers)}; "
            f"expected exactly {list(CONDITIONS)}"
        )
    for cond, tiers in cfg.eligible_tiers.items():
        for tier in tiers:
            if tier not in TRAINABLE_TIERS:
                raise ValueError(
                    f"curriculum.eligible_tiers.{cond} contains {tier!r}; allowed: strong, weak "
                    "(a condition tagged 'none' is never trained)"
                )
    _check_probability("curriculum.motion_frame_ratio", cfg.motion_frame_ratio)
    for name in ("text", "audio", "text_audio"):
        _check_probability(f"curriculum.cfg_dropout.{name}", getattr(cfg.cfg_dropout, name))


def stage_at(cfg: CurriculumConfig, step: int) -> tuple[int, StageConfig]:
    """The (0-based index, stage) in force at optimizer step ``step``."""
    index = 0
    for i, stage in enumerate(cfg.stages):
        if step >= stage.start_step:
            index = i
    return index, cfg.stages[index]


def tier_weight(cfg: CurriculumConfig, stage: StageConfig, cond: str, tier: str) -> float:
    """Weight of a ``tier`` sample for ``cond``'s task in ``stage`` (0 for tier "none")."""
    if tier not in TRAINABLE_TIERS:
        return 0.0
    if cond in stage.tier_weights:
        return float(stage.tier_weights[cond].get(tier, 0.0))
    return 1.0 if tier in cfg.eligible_tiers[cond] else 0.0


def _stage_probability(cfg: CurriculumConfig, stage: StageConfig, cond: str, tier: str) -> float:
    return stage.ratios[cond] * tier_weight(cfg, stage, cond, tier)


def activation_probability(cfg: CurriculumConfig, step: int, cond: str, tier: str) -> float:
    """Probability, before CFG dropout, that ``cond`` is active for a ``tier`` sample.

    Inside a ramp of R steps starting at the stage's first step S, the value moves linearly
    from the previous stage's (0 before the first stage) and is reached at step S + R - 1.
    """
    index, stage = stage_at(cfg, step)
    target = _stage_probability(cfg, stage, cond, tier)
    ramp = int(stage.ramp_steps.get(cond, 0))
    into = step - stage.start_step + 1
    if ramp <= 0 or into >= ramp:
        return target
    previous = _stage_probability(cfg, cfg.stages[index - 1], cond, tier) if index else 0.0
    return previous + (target - previous) * into / ramp


def _kept_after_dropout(cfg: CurriculumConfig, cond: str) -> float:
    if cond not in GUIDED:
        return 1.0
    return (1.0 - getattr(cfg.cfg_dropout, cond)) * (1.0 - cfg.cfg_dropout.text_audio)


def effective_ratio(cfg: CurriculumConfig, step: int, cond: str, tier: str) -> float:
    """Probability that ``cond`` ends up active for a ``tier`` sample at ``step``."""
    return activation_probability(cfg, step, cond, tier) * _kept_after_dropout(cfg, cond)


def source_weights_at(
    cfg: CurriculumConfig, step: int, defaults: Mapping[str, float]
) -> dict[str, float]:
    """Each data source's sampling weight at ``step``: the stage's, else its default."""
    _, stage = stage_at(cfg, step)
    unknown = sorted(set(stage.source_weights) - set(defaults))
    if unknown:
        raise ValueError(
            f"curriculum stage {stage.name!r} source_weights names {unknown}, which are not in "
            f"data.sources ({sorted(defaults)})"
        )
    return {name: float(stage.source_weights.get(name, w)) for name, w in defaults.items()}


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

    A condition is active for a sample when a draw falls under its activation probability
    (stage ratio x the sample's tier weight, ramped) and no CFG dropout draw switches it off.
    A condition tagged "none" is never active.
    """
    if len(keys) != len(qualities):
        raise ValueError(f"{len(keys)} keys but {len(qualities)} quality records")
    masks = {cond: np.zeros(len(keys), dtype=bool) for cond in CONDITIONS}
    dropout = cfg.cfg_dropout
    for i, (key, quality) in enumerate(zip(keys, qualities, strict=True)):
        # Four activation draws, then text, audio and joint dropout draws.
        draws = _rng(seed, step, key_hash(key)).random(len(CONDITIONS) + 3)
        for draw, cond in zip(draws, CONDITIONS, strict=False):
            tier = quality.get(cond, "none")
            masks[cond][i] = draw < activation_probability(cfg, step, cond, tier)
        drop_text, drop_audio, drop_both = draws[len(CONDITIONS) :]
        if drop_text < dropout.text or drop_both < dropout.text_audio:
            masks["text"][i] = False
        if drop_audio < dropout.audio or drop_both < dropout.text_audio:
            masks["audio"][i] = False
    return masks


def motion_latents_for_step(
    cfg: CurriculumConfig, step: int, seed: int, motion_latents: int
) -> int:
    """How many leading latent frames are clean motion frames for this step's batches."""
    draw = _rng(seed, step, 0x6D6F74).random()
    return motion_latents if draw < cfg.motion_frame_ratio else 0
