"""One micro-batch's loss and the metrics row built from it."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from omni_train.data.batch import Batch
from omni_train.diffusion.config import DiffusionConfig
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_frozen_encoders
from omni_train.trainer.step import StepResult, StepTotals, compute_loss, step_seed, task_of


def _batch(batch_size=2, frames=9, size=32):
    g = torch.Generator().manual_seed(0)
    return Batch(
        video=torch.rand(batch_size, 3, frames, size, size, generator=g) * 2 - 1,
        ref=torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
        audio=torch.randn(batch_size, 16_000 * frames // 8, generator=g) * 0.1,
        keypoints=torch.rand(batch_size, frames, 17, 3, generator=g),
        captions=["a person talks", ""][:batch_size],
        keys=[f"k{i}" for i in range(batch_size)],
        quality=[{}] * batch_size,
        has_audio=torch.tensor([True, False][:batch_size]),
    )


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = ModelConfig()
    return build_frozen_encoders(cfg), build_denoiser(cfg)


def _masks(text, ref, audio, pose):
    return {
        "text": np.array(text),
        "ref": np.array(ref),
        "audio": np.array(audio),
        "pose": np.array(pose),
    }


def _loss(parts, masks, seed=1, motion=0):
    encoders, denoiser = parts
    gen = torch.Generator().manual_seed(seed)
    return compute_loss(
        denoiser, encoders, _batch(), masks, motion, DiffusionConfig(), gen, torch.device("cpu")
    )


def test_loss_is_seeded_and_trains_every_module(parts):
    masks = _masks([True, True], [True, False], [True, True], [False, True])
    a, b = _loss(parts, masks), _loss(parts, masks)
    assert torch.equal(a.per_sample, b.per_sample)
    assert not torch.equal(a.per_sample, _loss(parts, masks, seed=2).per_sample)
    a.loss.backward()
    denoiser = parts[1]
    unused = [n for n, p in denoiser.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    denoiser.zero_grad(set_to_none=True)


def test_the_result_holds_the_padded_text_length_that_ran(parts):
    # "a person talks" is 14 bytes + the end token under the byte-level tokenizer; the batch
    # pads to it, not to text_encoder.max_length (64).
    masks = _masks([True, False], [True, True], [True, True], [True, True])
    result = _loss(parts, masks)
    assert result.text_tokens == [15, 15]
    merged = StepResult.merge([result.detach(), result.detach()])
    assert merged.text_tokens == [15] * 4


def test_audio_is_off_for_a_clip_without_a_track(parts):
    result = _loss(parts, _masks([True, True], [True, True], [True, True], [True, True]))
    assert result.active["audio"].tolist() == [True, False]
    assert result.tasks == ["pose", "pose"]


def test_a_condition_off_for_the_whole_batch_still_gives_every_module_a_gradient(parts):
    result = _loss(parts, _masks([False, False], [True, True], [False, False], [False, False]))
    result.loss.backward()
    denoiser = parts[1]
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)
    denoiser.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def live_denoiser(parts):
    """The denoiser with its zero-initialised weights (pose patch embedding, gates, final
    layer) randomised, so every condition, pose included, reaches the loss."""
    denoiser = copy.deepcopy(parts[1])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in denoiser.parameters():
            if param.abs().max() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return denoiser


def _per_sample(parts, denoiser, masks, batch=None, model=None):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        result = compute_loss(
            model or denoiser,
            parts[0],
            batch or _batch(),
            masks,
            0,
            DiffusionConfig(),
            gen,
            torch.device("cpu"),
        )
    return result.per_sample


def test_a_sample_with_pose_off_ignores_its_keypoints(parts, live_denoiser):
    masks = _masks([True, True], [True, True], [True, True], [True, False])
    batch = _batch()
    moved = dataclasses.replace(batch, keypoints=torch.rand(batch.keypoints.shape))
    base = _per_sample(parts, live_denoiser, masks, batch)
    changed = _per_sample(parts, live_denoiser, masks, moved)
    assert abs(float(changed[0] - base[0])) > 1e-5  # pose on: its keypoints matter
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=0)


def test_pose_off_for_the_whole_batch_is_the_model_without_pose(parts, live_denoiser):
    masks = _masks([True, True], [True, True], [True, True], [False, False])

    def without_pose(*args, **kwargs):
        return live_denoiser(*args, **{**kwargs, "pose_heatmaps": None})

    torch.testing.assert_close(
        _per_sample(parts, live_denoiser, masks),
        _per_sample(parts, live_denoiser, masks, model=without_pose),
        rtol=0,
        atol=0,
    )
    on = _masks([True, True], [True, True], [True, True], [True, True])
    with_pose = _per_sample(parts, live_denoiser, on)
    assert (
        with_pose - _per_sample(parts, live_denoiser, on, model=without_pose)
    ).abs().min() > 1e-5


def test_rows_sum_over_ranks_and_micro_batches():
    def result(losses, audio, tasks):
        n = len(losses)
        return StepResult(
            loss=None,
            per_sample=torch.tensor(losses),
            active={
                "text": torch.ones(n, dtype=torch.bool),
                "ref": torch.zeros(n, dtype=torch.bool),
                "audio": torch.tensor(audio),
                "pose": torch.zeros(n, dtype=torch.bool),
            },
            num_motion_latents=0,
            corrupt_skipped=1,
            tasks=tasks,
            text_tokens=[2] * n,
        )

    merged = StepResult.merge(
        [result([1.0, 3.0], [True, False], ["audio", "text"]), result([2.0], [False], ["text"])]
    )
    other_rank = result([6.0], [True], ["audio"])
    cpu = torch.device("cpu")
    summed = merged.totals(flops=10.0).to_tensor(cpu) + other_rank.totals(flops=5.0).to_tensor(cpu)
    totals = StepTotals.from_tensor(summed)
    assert (totals.flops, totals.text_tokens, totals.count) == (15.0, 8.0, 4.0)
    row = totals.row()
    assert row["loss"] == pytest.approx(3.0)
    assert row["batch_size"] == 4
    assert (row["active_text"], row["active_ref"], row["active_audio"]) == (4, 0, 2)
    assert row["count_task_audio"] == 2 and row["loss_task_audio"] == pytest.approx(3.5)
    assert row["count_task_text"] == 2 and row["loss_task_text"] == pytest.approx(2.5)
    assert "loss_task_pose" not in row
    assert row["corrupt_skipped"] == 2


def test_task_is_the_strongest_active_condition():
    assert task_of({"text": True, "ref": True, "audio": False, "pose": False}) == "ref"
    assert task_of({"text": False, "ref": False, "audio": False, "pose": True}) == "pose"
    assert task_of({"text": False, "ref": False, "audio": False, "pose": False}) == "uncond"


def test_step_seeds_differ_by_every_coordinate():
    seeds = {step_seed(0, s, r, m) for s in range(3) for r in range(2) for m in range(2)}
    assert len(seeds) == 12
    assert step_seed(0, 1, 0, 0) == step_seed(0, 1, 0, 0)


def test_step_totals_survive_the_vector_field_by_field():
    totals = StepTotals(
        loss_sum=1.0,
        count=2.0,
        active={"text": 3.0, "ref": 4.0, "audio": 5.0, "pose": 6.0},
        task_loss_sums={"uncond": 7.0, "text": 8.0, "ref": 9.0, "audio": 10.0, "pose": 11.0},
        task_counts={"uncond": 12.0, "text": 13.0, "ref": 14.0, "audio": 15.0, "pose": 16.0},
        corrupt_skipped=17.0,
        flops=18.0,
        text_tokens=19.0,
    )
    assert StepTotals.from_tensor(totals.to_tensor(torch.device("cpu"))) == totals
    with pytest.raises(ValueError, match="has 19 values, got 20"):
        StepTotals.from_tensor(torch.zeros(20))
