"""Curriculum metrics: counts add up, realised ratios per stage track the configured ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_train.curriculum import (
    CONDITIONS,
    CurriculumConfig,
    CurriculumMeter,
    StageConfig,
    StageTotals,
    condition_masks,
    step_counts,
    step_metrics,
)
from omni_train.curriculum.stats import count_names, task_names


def _cfg() -> CurriculumConfig:
    return CurriculumConfig(
        stages=[
            StageConfig("s1", 0, {"text": 0.9, "ref": 0.7, "audio": 0.0, "pose": 0.0}),
            StageConfig("s2", 20, {"text": 0.9, "ref": 0.7, "audio": 0.5, "pose": 0.0}),
            StageConfig("s3", 40, {"text": 0.9, "ref": 0.7, "audio": 0.5, "pose": 0.5}),
        ]
    )


def _qualities(n: int, seed: int = 0) -> list[dict]:
    """A mix like a real corpus: most clips only good enough for text and reference."""
    rng = np.random.default_rng(seed)
    tiers = np.array(["strong", "weak", "none"])
    return [
        {
            "text": str(tiers[rng.choice(3, p=[0.6, 0.3, 0.1])]),
            "ref": str(tiers[rng.choice(3, p=[0.7, 0.3, 0.0])]),
            "audio": str(tiers[rng.choice(3, p=[0.3, 0.4, 0.3])]),
            "pose": str(tiers[rng.choice(3, p=[0.2, 0.5, 0.3])]),
        }
        for _ in range(n)
    ]


def test_counts_of_one_batch():
    cfg = _cfg()
    qualities = [
        {"text": "strong", "ref": "weak", "audio": "strong", "pose": "none"},
        {"text": "none", "ref": "strong", "audio": "weak", "pose": "strong"},
        {"text": "weak", "ref": "strong", "audio": "strong", "pose": "weak"},
    ]
    masks = {
        "text": np.array([True, False, False]),
        "ref": np.array([True, True, False]),
        "audio": np.array([True, False, True]),
        "pose": np.array([False, True, False]),
    }
    counts = step_metrics(cfg, 45, masks, qualities, has_audio=[True, True, False])
    assert counts["samples"] == 3
    assert counts["active_text"] == 1 and counts["eligible_text"] == 2
    # The third clip has no audio track: neither eligible nor active for audio.
    assert counts["eligible_audio"] == 1 and counts["active_audio"] == 1
    assert counts["ratio_audio"] == 1.0 and counts["target_ratio_audio"] == 0.5
    assert counts["eligible_pose"] == 1 and counts["expected_pose"] == 0.5
    assert counts["tier_pose_none"] == 1 and counts["tier_share_ref_strong"] == pytest.approx(2 / 3)
    assert counts["count_task_audio"] == 1 and counts["count_task_pose"] == 1
    assert counts["count_task_uncond"] == 1
    assert set(count_names()) <= set(counts)


def test_task_is_the_strongest_active_condition():
    masks = {
        "text": np.array([True, True, False]),
        "ref": np.array([False, True, False]),
        "audio": np.array([False, True, False]),
        "pose": np.array([False, False, False]),
    }
    assert task_names(masks) == ["text", "audio", "uncond"]


def test_stage_totals_track_the_configured_ratios_per_stage_across_ranks():
    """A 60-step, 2-rank run of 32 samples per rank and step, like the smoke schedule."""
    cfg = _cfg()
    totals = StageTotals(cfg)
    logged = {}
    for step in range(60):
        summed: dict[str, float] = {}
        for rank in range(2):
            qualities = _qualities(32, seed=step * 2 + rank)
            keys = [f"s{step}r{rank}i{i}" for i in range(32)]
            masks = condition_masks(cfg, step, keys, qualities, seed=0)
            counts = step_counts(cfg, step, masks, qualities)
            summed = {n: summed.get(n, 0.0) + counts[n] for n in count_names()}
        logged = totals.update(step, summed)
        stage = 1 + (step >= 20) + (step >= 40)
        for cond in CONDITIONS:
            key = f"stage{stage}/ratio_{cond}"
            if step % 20 == 19 and f"stage{stage}/target_ratio_{cond}" in logged:
                eligible = totals.totals[stage][f"eligible_{cond}"]
                target = logged[f"stage{stage}/target_ratio_{cond}"]
                assert target == pytest.approx(cfg.stages[stage - 1].ratios[cond])
                sigma = np.sqrt(max(target * (1 - target), 1e-12) / eligible)
                assert abs(logged[key] - target) <= 4 * sigma + 1e-9, (step, cond)
    assert logged["stage3/samples"] == 20 * 64
    restored = StageTotals(cfg, totals.state_dict())
    assert restored.totals == totals.totals


def test_weak_pose_and_audio_clips_are_counted_in_the_tier_mix():
    cfg = _cfg()
    qualities = _qualities(500, seed=1)
    keys = [f"k{i}" for i in range(500)]
    metrics = step_metrics(cfg, 45, condition_masks(cfg, 45, keys, qualities, 0), qualities)
    weak_pose = sum(q["pose"] == "weak" for q in qualities)
    assert metrics["tier_pose_weak"] == weak_pose
    assert metrics["eligible_pose"] == sum(q["pose"] == "strong" for q in qualities)
    # Weak-pose clips still train text: more text samples than pose-eligible ones.
    assert metrics["active_text"] > metrics["eligible_pose"]


def test_meter_sums_ranks_and_micro_batches_between_logs_across_a_stage_change():
    cfg = _cfg()
    meters = [CurriculumMeter(cfg), CurriculumMeter(cfg)]
    expected_active_audio = 0
    for step in range(16, 24):  # one log interval over the stage 1 -> 2 boundary at 20
        for rank, meter in enumerate(meters):
            for micro in range(2):
                qualities = _qualities(8, seed=100 * step + 10 * rank + micro)
                keys = [f"{step}-{rank}-{micro}-{i}" for i in range(8)]
                masks = condition_masks(cfg, step, keys, qualities, seed=0)
                expected_active_audio += int(masks["audio"].sum())
                has_audio = torch.ones(8, dtype=torch.bool)  # as the loader's batches carry it
                meter.add(step, masks, qualities, has_audio=has_audio)
    summed = np.sum([m.vector() for m in meters], axis=0).tolist()
    out = meters[0].flush(23, summed)
    assert out["stage1/samples"] == 4 * 2 * 2 * 8 and out["stage2/samples"] == 4 * 2 * 2 * 8
    assert out["stage2/ratio_audio"] * meters[0].totals.totals[2]["eligible_audio"] == (
        expected_active_audio
    )
    assert "target_ratio_audio" in out and "stage2/target_ratio_audio" in out
    assert not any(meters[0].vector())  # flushed
    restored = CurriculumMeter(cfg, meters[0].state_dict())
    assert restored.totals.totals == meters[0].totals.totals
