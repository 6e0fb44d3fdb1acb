"""Ramps, per-stage tier weights (the data mix) and CFG dropout of the curriculum."""

from __future__ import annotations

import numpy as np
import pytest

from omni_train.curriculum import (
    CONDITIONS,
    CfgDropoutConfig,
    CurriculumConfig,
    StageConfig,
    activation_probability,
    condition_masks,
    effective_ratio,
    validate_curriculum,
)
from omni_train.testing import compose_train_config

STRONG = {c: "strong" for c in CONDITIONS}
WEAK = {c: "weak" for c in CONDITIONS}
N = 4000


def _within(realised: float, p: float, n: int = N) -> bool:
    return abs(realised - p) <= 4 * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


def _masks(cfg, step, quality, seed=0, n=N):
    keys = [f"clip{i:05d}" for i in range(n)]
    return condition_masks(cfg, step, keys, [quality] * n, seed=seed)


def _ramped() -> CurriculumConfig:
    return CurriculumConfig(
        stages=[
            StageConfig("s1", 0, {"text": 1.0, "ref": 0.7, "audio": 0.0, "pose": 0.0}),
            StageConfig(
                "s2",
                100,
                {"text": 1.0, "ref": 0.7, "audio": 0.8, "pose": 0.0},
                ramp_steps={"audio": 40},
            ),
            StageConfig(
                "s3",
                200,
                {"text": 1.0, "ref": 0.7, "audio": 0.4, "pose": 0.5},
                tier_weights={
                    "pose": {"strong": 1.0, "weak": 0.2},
                    "audio": {"strong": 1.0, "weak": 0.5},
                },
            ),
        ]
    )


def test_ramp_moves_linearly_from_the_previous_stage_and_ends_on_time():
    cfg = _ramped()
    validate_curriculum(cfg)
    probability = [activation_probability(cfg, s, "audio", "strong") for s in range(95, 150)]
    assert probability[:5] == [0.0] * 5  # stage 1: audio off
    assert probability[5] == pytest.approx(0.8 / 40)  # step 100: first ramp step
    assert probability[5 + 19] == pytest.approx(0.8 * 20 / 40)
    assert probability[5 + 39] == pytest.approx(0.8)  # step 139: the ramp is done
    assert all(p == pytest.approx(0.8) for p in probability[5 + 39 :])
    assert np.all(np.diff(probability[5 : 5 + 40]) > 0)
    # Conditions without a ramp switch at the boundary.
    assert activation_probability(cfg, 200, "pose", "strong") == 0.5
    assert activation_probability(cfg, 199, "pose", "strong") == 0.0


@pytest.mark.parametrize("step", [105, 119, 150])
def test_realised_ratio_follows_the_ramp(step):
    cfg = _ramped()
    realised = _masks(cfg, step, STRONG, seed=2)["audio"].mean()
    assert _within(realised, activation_probability(cfg, step, "audio", "strong"))


def test_tier_weights_set_the_data_mix_per_stage():
    cfg = _ramped()
    strong, weak = _masks(cfg, 250, STRONG, seed=4), _masks(cfg, 250, WEAK, seed=4)
    assert _within(strong["pose"].mean(), 0.5) and _within(weak["pose"].mean(), 0.5 * 0.2)
    assert _within(strong["audio"].mean(), 0.4) and _within(weak["audio"].mean(), 0.4 * 0.5)
    # Not listed in stage 3's tier_weights: eligible_tiers decides (audio strong only
    # before stage 3, text and ref from weak clips too).
    assert _within(weak["ref"].mean(), 0.7) and weak["text"].all()
    assert not _masks(cfg, 150, WEAK)["audio"].any()


def test_weak_clips_train_the_weaker_tasks_in_every_stage():
    cfg = CurriculumConfig()  # the paper's three stages
    weak_strong = {"text": "strong", "ref": "strong", "audio": "weak", "pose": "weak"}
    for index, stage in enumerate(cfg.stages):
        masks = _masks(cfg, stage.start_step, weak_strong, seed=index, n=2000)
        assert _within(masks["text"].mean(), stage.ratios["text"], 2000)
        assert _within(masks["ref"].mean(), stage.ratios["ref"], 2000)
        assert not masks["audio"].any() and not masks["pose"].any()


def test_cfg_dropout_switches_guided_conditions_off_at_the_configured_rate():
    base = _ramped()
    base.cfg_dropout = CfgDropoutConfig(text=0.1, audio=0.2, text_audio=0.05)
    masks = _masks(base, 250, STRONG, seed=5)
    assert _within(masks["text"].mean(), 1.0 * 0.9 * 0.95)
    assert _within(masks["audio"].mean(), 0.4 * 0.8 * 0.95)
    assert _within(masks["ref"].mean(), 0.7)  # reference and pose are never dropped
    assert effective_ratio(base, 250, "text", "strong") == pytest.approx(0.9 * 0.95)
    # The joint dropout gives samples with neither text nor audio (the sampler's uncond).
    both_off = (~masks["text"] & ~masks["audio"]).mean()
    assert both_off > 0.05


def test_dropout_and_ramps_keep_assignments_independent_of_the_split():
    cfg = _ramped()
    cfg.cfg_dropout = CfgDropoutConfig(text=0.3, audio=0.3, text_audio=0.1)
    keys = [f"k{i}" for i in range(96)]
    whole = condition_masks(cfg, 110, keys, [STRONG] * 96, seed=9)
    for world_size in (2, 3, 8):
        for rank in range(world_size):
            part = keys[rank::world_size]
            got = condition_masks(cfg, 110, part, [STRONG] * len(part), seed=9)
            for cond in CONDITIONS:
                assert list(got[cond]) == [whole[cond][keys.index(k)] for k in part]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.stages[1].ramp_steps.__setitem__("audio", -1), "stages.1.ramp_steps.audio"),
        (lambda c: c.stages[1].ramp_steps.__setitem__("lips", 3), "stages.1.ramp_steps.lips"),
        (lambda c: c.stages[2].tier_weights.__setitem__("pose", {"none": 1.0}), "pose.none"),
        (lambda c: c.stages[2].tier_weights.__setitem__("pose", {"weak": 2.0}), "pose.weak"),
        (lambda c: setattr(c.cfg_dropout, "audio", 1.5), "cfg_dropout.audio"),
    ],
)
def test_invalid_spec_names_the_key(mutate, message):
    cfg = _ramped()
    mutate(cfg)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate_curriculum(cfg)


def test_spec_is_overridable_from_the_command_line():
    cfg, _ = compose_train_config(
        [
            "run_dir=unused",
            "experiment=smoke",
            "curriculum.stages.1.ramp_steps.audio=10",
            "+curriculum.stages.2.tier_weights.pose={strong:1.0,weak:0.3}",
            "curriculum.cfg_dropout.text_audio=0.1",
        ]
    )
    cur = cfg.curriculum
    validate_curriculum(cur)
    assert [s.start_step for s in cur.stages] == [0, 20, 40]  # smoke keeps its meaning
    assert cur.stages[1].ramp_steps["audio"] == 10
    assert activation_probability(cur, 20, "audio", "strong") == pytest.approx(0.5 / 10)
    assert activation_probability(cur, 45, "pose", "weak") == pytest.approx(0.5 * 0.3)
    assert cur.cfg_dropout.text_audio == 0.1


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_audio_ablation_experiment_sets_one_ratio_for_stages_2_and_3(ratio):
    cfg, resolved = compose_train_config(
        ["experiment=smoke_audio_ablation", f"curriculum.stages.1.ratios.audio={ratio}"]
    )
    assert [s.ratios["audio"] for s in cfg.curriculum.stages] == [0.0, ratio, ratio]
    assert [s.start_step for s in cfg.curriculum.stages] == [0, 20, 40]
    assert cfg.run_dir.endswith(f"audio_{ratio}") and cfg.trainer.max_steps == 60
