from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from omni_train.curriculum import (
    CONDITIONS,
    CurriculumConfig,
    StageConfig,
    condition_masks,
    motion_latents_for_step,
    stage_at,
    validate_curriculum,
)

ALL_STRONG = {c: "strong" for c in CONDITIONS}


def _three_stages() -> CurriculumConfig:
    return CurriculumConfig(
        stages=[
            StageConfig("s1", 0, {"text": 1.0, "ref": 0.7, "audio": 0.0, "pose": 0.0}),
            StageConfig("s2", 10, {"text": 1.0, "ref": 0.7, "audio": 0.5, "pose": 0.0}),
            StageConfig("s3", 20, {"text": 1.0, "ref": 0.7, "audio": 0.5, "pose": 0.25}),
        ]
    )


def test_default_curriculum_is_valid_and_follows_the_paper_order():
    cfg = CurriculumConfig()
    validate_curriculum(cfg)
    s1, s2, s3 = (s.ratios for s in cfg.stages)
    assert s1["audio"] == 0 and s1["pose"] == 0
    assert s2["audio"] > 0 and s2["pose"] == 0
    assert s3["pose"] > 0
    # Principle 2: the stronger the condition, the lower its ratio.
    assert s3["text"] >= s3["ref"] >= s3["audio"] >= s3["pose"]


@pytest.mark.parametrize(
    ("step", "expected"), [(0, "s1"), (9, "s1"), (10, "s2"), (19, "s2"), (20, "s3"), (10**6, "s3")]
)
def test_stage_boundaries_switch_at_configured_steps(step, expected):
    assert stage_at(_three_stages(), step)[1].name == expected


def test_condition_tagged_none_is_never_active():
    cfg = _three_stages()
    keys = [f"k{i}" for i in range(500)]
    quality = {"text": "none", "ref": "strong", "audio": "none", "pose": "none"}
    masks = condition_masks(cfg, 25, keys, [quality] * len(keys), seed=0)
    assert not masks["text"].any() and not masks["audio"].any() and not masks["pose"].any()
    assert masks["ref"].any()


def test_weak_audio_and_pose_clips_still_train_text_and_reference():
    cfg = _three_stages()
    keys = [f"k{i}" for i in range(400)]
    weak = {"text": "strong", "ref": "weak", "audio": "weak", "pose": "weak"}
    masks = condition_masks(cfg, 25, keys, [weak] * len(keys), seed=1)
    assert masks["text"].all()
    assert 0.6 < masks["ref"].mean() < 0.8
    assert not masks["audio"].any() and not masks["pose"].any()


@pytest.mark.parametrize("step", [0, 15, 25])
def test_realised_ratios_match_the_stage_within_tolerance(step):
    cfg = _three_stages()
    n = 4000
    keys = [f"clip{i:05d}" for i in range(n)]
    masks = condition_masks(cfg, step, keys, [ALL_STRONG] * n, seed=3)
    ratios = stage_at(cfg, step)[1].ratios
    for cond in CONDITIONS:
        p = ratios[cond]
        tolerance = 4 * np.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(masks[cond].mean() - p) <= tolerance + 1e-9, cond


def test_assignment_is_independent_of_batch_split_and_order():
    cfg = _three_stages()
    keys = [f"k{i}" for i in range(64)]
    whole = condition_masks(cfg, 21, keys, [ALL_STRONG] * 64, seed=7)
    # The same samples split over 4 "ranks" in another order get the same decisions.
    for rank in range(4):
        part = keys[rank::4][::-1]
        got = condition_masks(cfg, 21, part, [ALL_STRONG] * len(part), seed=7)
        for cond in CONDITIONS:
            expected = [whole[cond][keys.index(k)] for k in part]
            assert list(got[cond]) == expected


def test_seed_and_step_change_the_draws():
    cfg = _three_stages()
    keys = [f"k{i}" for i in range(200)]
    a = condition_masks(cfg, 21, keys, [ALL_STRONG] * 200, seed=0)["ref"]
    b = condition_masks(cfg, 21, keys, [ALL_STRONG] * 200, seed=1)["ref"]
    c = condition_masks(cfg, 22, keys, [ALL_STRONG] * 200, seed=0)["ref"]
    assert (a != b).any() and (a != c).any()


def test_motion_frame_ratio_is_realised_over_steps():
    cfg = dataclasses.replace(_three_stages(), motion_frame_ratio=0.25)
    used = [motion_latents_for_step(cfg, s, seed=0, motion_latents=2) for s in range(4000)]
    assert set(used) == {0, 2}
    assert abs(np.mean([u == 2 for u in used]) - 0.25) < 0.03


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.stages[0].__setattr__("start_step", 5), "stages.0.start_step"),
        (lambda c: c.stages[2].__setattr__("start_step", 10), "stages.2.start_step"),
        (lambda c: c.stages[1].ratios.__setitem__("audio", 1.5), "stages.1.ratios.audio"),
        (lambda c: c.stages[1].ratios.pop("pose"), "stages.1.ratios"),
        (lambda c: c.eligible_tiers.__setitem__("audio", ["none"]), "eligible_tiers.audio"),
    ],
)
def test_invalid_curriculum_names_the_key(mutate, message):
    cfg = _three_stages()
    mutate(cfg)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate_curriculum(cfg)
