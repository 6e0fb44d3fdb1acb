"""Sequence-parallel sampling: the ranks of a group split each denoiser call's latent frames
(uneven counts), alone or with CFG-parallel slots, and give the one-process latents.

Tolerance: under SP each rank runs the projections on its own frames' rows and attends with
half the heads over the gathered sequence, so matmuls may round differently from one process.
Over two segments of two guided steps the latents may differ by at most LATENT_ATOL; seen on
CPU (fp32): 0.0 for the tiny MMDiT and for wan_tiny (the same passes batched the same way).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from omni_train.diffusion.cfg_parallel import cfg_parallel_from_env
from omni_train.diffusion.sampler import Guidance, euler_sample
from omni_train.diffusion.sequence_parallel_sampling import check_model, frame_counts
from omni_train.models.config import ModelConfig
from omni_train.testing import run_ranks

LATENT_ATOL = 1e-5
ANNEALED = Guidance(3.0, 1.0, 2.5, 1.0)  # three passes, then one at the unit-scale last step
needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="the foundation extra (diffusers) is not installed",
)


def test_frames_split_as_the_denoisers_split_them_first_ranks_one_more():
    assert frame_counts(3, 2) == [2, 1]
    assert frame_counts(5, 3) == [2, 2, 1]
    assert frame_counts(4, 2) == [2, 2]
    assert frame_counts(4, 1) == [4]


@pytest.mark.parametrize(
    ("world_size", "size", "message"),
    [
        (1, 2, r"sequence_parallel=2 must divide the ranks of the launch \(WORLD_SIZE=1\)"),
        (3, 2, r"sequence_parallel=2 must divide .*WORLD_SIZE=3.* a multiple of 2"),
        (8, 2, r"WORLD_SIZE=8 with sequence_parallel=2: .* --nproc_per_node 6 or fewer"),
        (2, 0, r"sequence_parallel=0 must be >= 1"),
    ],
)
def test_bad_layouts_are_refused_before_any_process_group(monkeypatch, world_size, size, message):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError, match=message):
        with cfg_parallel_from_env("cpu", size):
            pass
    assert not dist.is_initialized()


def test_heads_and_frames_that_cannot_split_are_refused_naming_the_setting():
    from omni_train.models.denoiser import build_denoiser

    model = build_denoiser(ModelConfig())  # 4 heads
    check_model(model, 2, latent_frames=2, segment=5)
    with pytest.raises(ValueError) as error:
        check_model(model, 3, latent_frames=5, segment=17)
    assert str(error.value) == (
        "sequence_parallel=3 does not divide model.dit.num_heads=4 (the attention heads are "
        "split over the sequence-parallel ranks); use one of [1, 2, 4]"
    )
    with pytest.raises(ValueError, match=r"sequence_parallel=4 is more than the 3 latent frames "):
        check_model(model, 4, latent_frames=3, segment=9)


# ----------------------------------------------------------------------------- euler steps
def affine_model(x, t, text_on, audio_on):
    """Elementwise in x, so batching and splitting cannot change a bit; each flag and each
    frame moves it differently (a frame gathered in the wrong place shows)."""
    shape = (-1, 1, 1, 1, 1)
    text = text_on.to(x.dtype).view(shape)
    audio = audio_on.to(x.dtype).view(shape)
    frame = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
    return 0.3 * x * t.view(shape) + 1.0 + 2.0 * text + 5.0 * audio * (1 + x) + 0.7 * frame


def noise():
    return torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _euler_in_rank(size: int):
    calls = []
    with cfg_parallel_from_env("cpu", size) as parallel:
        sp = parallel.sequence_parallel

        def own_frames(x, t, text_on, audio_on):  # a denoiser under SP: this rank's frames
            shard = sp.shard_frames(x.shape[2], tokens_per_frame=1)
            calls.append((x.shape[0], shard.start, shard.stop))
            return affine_model(x, t, text_on, audio_on)[:, :, shard.start : shard.stop]

        out = euler_sample(own_frames, noise(), 3, 2.0, ANNEALED, velocity=parallel.velocity)
        slot = parallel.slot
    return out.numpy(), calls, slot


@pytest.mark.parametrize("world_size", [2, 4])  # SP 2 alone; 2 CFG slots x SP 2
def test_every_rank_steps_the_whole_one_process_latents(world_size):
    expected = euler_sample(affine_model, noise(), 3, 2.0, ANNEALED, batched=False)
    results = run_ranks(_euler_in_rank, world_size, 2, timeout=120)
    for out, _, _ in results:
        assert torch.equal(torch.from_numpy(out), expected)
    # 3 latent frames: SP rank 0 holds 0:2, SP rank 1 holds 2:3. One slot runs the three
    # passes as a batch of 6 (then the unit-scale pass, batch 2); two slots split them 2 + 1,
    # the last step's single pass on slot 0 alone.
    shares = {2: [[6, 6, 2]], 4: [[4, 4, 2], [2, 2]]}[world_size]
    for rank, (_, calls, slot) in enumerate(results):
        assert slot == rank // 2
        frames = [(0, 2), (2, 3)][rank % 2]
        assert calls == [(batch, *frames) for batch in shares[slot]]


# ----------------------------------------------------------------------------- a real model
SEGMENT = 9  # 3 latent frames: SP ranks hold 2 + 1
TOTAL = 13  # two segments, the second after 5 motion frames (2 latent frames)


def _generate_in_rank(model_cfg: ModelConfig, size: int, resolution: int) -> dict:
    """generate_long_video on this rank (rank 0's seed; the others' generators drift), each
    segment's latents and the frames of each denoiser output recorded."""
    from omni_train.diffusion import sampler
    from omni_train.diffusion.config import DiffusionConfig
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.testing import pretrained_like

    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    denoiser = pretrained_like(build_denoiser(model_cfg)).eval()
    frames = set()
    denoiser.register_forward_hook(lambda module, args, out: frames.add(out.shape[2]))
    encoders = build_frozen_encoders(model_cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, resolution, resolution, generator=gen) * 2 - 1
    audio = torch.randn(16_000 * TOTAL // 8, generator=gen) * 0.1
    latents = []
    euler = sampler.euler_sample

    def recording(*args, **kwargs):
        out = euler(*args, **kwargs)
        latents.append(out.numpy().copy())
        return out

    sampler.euler_sample = recording
    diffusion = DiffusionConfig(sampling_steps=2)  # cfg 3.0 -> 1.5: three passes per step
    with cfg_parallel_from_env("cpu", size) as parallel:
        video = sampler.generate_long_video(
            denoiser,
            encoders,
            ref,
            audio,
            "a person talking",
            8.0,
            TOTAL,
            SEGMENT,
            diffusion,
            torch.Generator().manual_seed(0 if rank == 0 else 1000 + rank),
            parallel=parallel,
        )
    assert (video is None) == (rank > 0)
    return {"latents": latents, "frames": frames}


def _compare_with_one_process(model_cfg: ModelConfig, resolution: int) -> float:
    (one,) = run_ranks(_generate_in_rank, 1, model_cfg, 1, resolution, timeout=120)
    results = run_ranks(_generate_in_rank, 2, model_cfg, 2, resolution, timeout=120)
    expected = one["latents"]
    assert len(expected) == 2  # two segments
    # One process denoises the 3 latent frames; SP rank 0 frames 0:2, SP rank 1 frame 2.
    assert [one["frames"], *(r["frames"] for r in results)] == [{3}, {2}, {1}]
    for result in results:  # every rank stepped the same latents
        for mine, main in zip(result["latents"], results[0]["latents"], strict=True):
            assert np.array_equal(mine, main)
    worst = 0.0
    for got, want in zip(results[0]["latents"], expected, strict=True):
        assert got.shape[2] == 3 and np.abs(want).max() > 0.5
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def test_tiny_mmdit_sp2_samples_the_one_process_latents_over_two_segments():
    import omni_train.models.encoders  # noqa: F401 - imported once, before forking

    worst = _compare_with_one_process(ModelConfig(), resolution=32)
    assert worst <= LATENT_ATOL


@needs_diffusers
def test_wan_sp2_samples_the_one_process_latents_over_two_segments():
    from omni_train.config import compose_train_config

    cfg, _ = compose_train_config(["model=wan_tiny", "run_dir=unused"])
    worst = _compare_with_one_process(cfg.model, resolution=32)
    assert worst <= LATENT_ATOL
