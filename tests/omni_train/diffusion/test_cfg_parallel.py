"""CFG-parallel sampling: the guidance passes of each step on 2 or 3 ranks give the 1-rank
latents and video.

Tolerances: a rank runs its passes as a batch of 1 (or 2) where one process runs the three
as one batch of 3, so the denoiser's matmuls round differently. Over the tiny checkpoint's
two segments of two steps the latents differ by at most LATENT_ATOL (seen: 1.1e-6 in the
first segment, 4.7e-6 in the second, after the motion frames' re-encoding); the uint8 frames
handed to the encoder by at most FRAME_ATOL level (seen: 41-45 of 356,352 values differ, by
1). H.264 spreads those few one-level differences over its blocks (this untrained model's
video is noise-like), so two mp4s are compared by PSNR >= MP4_PSNR (seen: 41 dB; 22 dB
with the passes combined in the wrong order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from omni_train.diffusion.cfg_parallel import cfg_parallel_from_env, deal_passes
from omni_train.diffusion.sampler import Guidance, euler_sample
from omni_train.testing import run_ranks

ROOT = Path(__file__).resolve().parents[3]
LATENT_ATOL = 1e-5
FRAME_ATOL = 1
MP4_PSNR = 35.0
# Annealed to unit scales at the last step: three passes, then one.
ANNEALED = Guidance(3.0, 1.0, 2.5, 1.0)


def test_passes_are_dealt_in_order_contiguously_larger_shares_first():
    assert deal_passes(3, 1) == [[0, 1, 2]]
    assert deal_passes(3, 2) == [[0, 1], [2]]
    assert deal_passes(3, 3) == [[0], [1], [2]]
    assert deal_passes(1, 3) == [[0], [], []]  # unit scales: rank 0 alone


def test_more_ranks_than_passes_are_refused_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4: .* --nproc_per_node 3 or fewer"):
        with cfg_parallel_from_env("cpu"):
            pass
    assert not dist.is_initialized()


def test_a_plain_process_samples_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with cfg_parallel_from_env("cpu") as parallel:
        assert parallel is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    with cfg_parallel_from_env("cpu") as parallel:
        assert parallel is None
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- euler steps
def affine_model(x, t, text_on, audio_on):
    """Elementwise in x, so batching cannot change a bit; each flag moves it differently."""
    shape = (-1, 1, 1, 1, 1)
    text = text_on.to(x.dtype).view(shape)
    audio = audio_on.to(x.dtype).view(shape)
    return 0.3 * x * t.view(shape) + 1.0 + 2.0 * text + 5.0 * audio * (1 + x)


def noise():
    return torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _euler_in_rank():
    from omni_train.diffusion.cfg_parallel import cfg_parallel_from_env

    calls = []

    def recording(x, t, text_on, audio_on):
        calls.append((text_on.tolist(), audio_on.tolist()))
        return affine_model(x, t, text_on, audio_on)

    with cfg_parallel_from_env("cpu") as parallel:
        out = euler_sample(recording, noise(), 3, 2.0, ANNEALED, velocity=parallel.velocity)
    return out.numpy(), calls  # tensors would leave through shared memory the rank frees


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_runs_its_passes_and_every_rank_takes_the_guided_step(world_size):
    expected = euler_sample(affine_model, noise(), 3, 2.0, ANNEALED, batched=False)
    results = run_ranks(_euler_in_rank, world_size, timeout=120)
    for out, _ in results:
        assert torch.equal(torch.from_numpy(out), expected)
    # (text_on, audio_on) of each call, batch 2 per pass, in guided_velocity's pass order.
    unconditional = ([False] * 2, [False] * 2)
    text = ([True] * 2, [False] * 2)
    text_audio = ([True] * 2, [True] * 2)
    shares = {
        2: [[unconditional, text], [text_audio]],
        3: [[unconditional], [text], [text_audio]],
    }[world_size]
    for rank, (_, calls) in enumerate(results):
        share = (sum((p[0] for p in shares[rank]), []), sum((p[1] for p in shares[rank]), []))
        expected_calls = [share, share]  # the two guided steps
        if rank == 0:
            expected_calls.append(text_audio)  # the unit-scale step: one pass, on rank 0
        assert calls == expected_calls


# ----------------------------------------------------------------------------- a checkpoint
SAMPLING_STEPS = 2  # cfg 3.0 -> 1.5: both steps guided, three passes each


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny smoke checkpoint with every weight non-zero (text and audio change the output),
    and a 2 s clip at 8 fps as reference image and audio: two 17-frame segments."""
    from omegaconf import OmegaConf

    from omni_train.media import write_mp4
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.models.weights import save_safetensors
    from omni_train.testing import compose_train_config, pretrained_like

    root = tmp_path_factory.mktemp("cfg_parallel")
    cfg, resolved = compose_train_config(["experiment=smoke", f"run_dir={root}/run"])
    torch.manual_seed(0)
    folder = root / "run" / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    denoiser = pretrained_like(build_denoiser(cfg.model))
    save_safetensors(denoiser.state_dict(), folder / "model.safetensors")
    save_safetensors(build_frozen_encoders(cfg.model).state_dict(), folder / "frozen.safetensors")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (folder / "complete.json").write_text(json.dumps({"step": 1}))
    gen = np.random.default_rng(0)
    frames = gen.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    wave = (0.3 * np.sin(np.arange(32_000) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    write_mp4(root / "clip.mp4", frames, 8.0, wave)
    return folder, root / "clip.mp4"


def sample_args(folder: Path, clip: Path, out: Path, seed: int = 0) -> list[str]:
    return [
        f"checkpoint={folder}",
        f"ref_image={clip}",
        f"audio={clip}",
        f"out={out}",
        "caption=a person talking",
        f"sampling_steps={SAMPLING_STEPS}",
        f"seed={seed}",
    ]


def _sample_in_rank(folder: Path, clip: Path, out: Path, drift_seeds: bool) -> dict:
    """run_sampling in this rank, each segment's latents recorded; with ``drift_seeds`` the
    ranks after the first are given other seeds (their noise must not matter)."""
    from omni_train import media
    from omni_train.config import SampleConfig
    from omni_train.diffusion import sampler
    from omni_train.sample import run_sampling

    rank = int(os.environ["RANK"])
    latents, frames = [], []
    euler, write_mp4 = sampler.euler_sample, media.write_mp4

    def recording_euler(*args, **kwargs):
        out = euler(*args, **kwargs)
        latents.append(out.numpy().copy())
        return out

    def recording_write(path, video, *args, **kwargs):
        frames.append(video.copy())
        return write_mp4(path, video, *args, **kwargs)

    sampler.euler_sample, media.write_mp4 = recording_euler, recording_write
    seed = 1000 + rank if drift_seeds and rank > 0 else 0
    written = run_sampling(
        SampleConfig(
            checkpoint=str(folder),
            ref_image=str(clip),
            audio=str(clip),
            out=str(out),
            caption="a person talking",
            sampling_steps=SAMPLING_STEPS,
            seed=seed,
        )
    )
    return {"written": written, "latents": latents, "frames": frames}


@pytest.fixture(scope="module")
def one_rank(checkpoint, tmp_path_factory):
    folder, clip = checkpoint
    out = tmp_path_factory.mktemp("one_rank") / "sample.mp4"
    (result,) = run_ranks(_sample_in_rank, 1, folder, clip, out, False, timeout=300)
    assert result["written"] == out and len(result["latents"]) == 2  # two segments
    return result


@pytest.mark.parametrize("world_size", [2, 3])
def test_cfg_parallel_sampling_gives_the_one_rank_latents_and_frames(
    checkpoint, one_rank, world_size, tmp_path
):
    from omni_train.media import read_video

    folder, clip = checkpoint
    expected = one_rank
    out = tmp_path / "sample.mp4"
    # 3 ranks: the other ranks' seeds differ, rank 0's noise is the one used.
    results = run_ranks(_sample_in_rank, world_size, folder, clip, out, world_size == 3)
    assert [r["written"] for r in results] == [out] + [None] * (world_size - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.mp4"]
    for result in results:  # every rank stepped the same latents
        for mine, main in zip(result["latents"], results[0]["latents"], strict=True):
            assert np.array_equal(mine, main)
    for got, want in zip(results[0]["latents"], expected["latents"], strict=True):
        assert np.abs(want).max() > 0.5
        np.testing.assert_allclose(got, want, rtol=0, atol=LATENT_ATOL)
    (frames,), (expected_frames,) = results[0]["frames"], expected["frames"]
    assert frames.shape == expected_frames.shape == (29, 64, 64, 3)
    difference = np.abs(frames.astype(int) - expected_frames.astype(int))
    assert difference.max() <= FRAME_ATOL
    assert read_video(out).shape == (29, 64, 64, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.mark.slow
def test_torchrun_on_3_ranks_writes_the_one_process_mp4(checkpoint, one_rank, tmp_path):
    from omni_train.media import read_video

    folder, clip = checkpoint
    out = tmp_path / "sample.mp4"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "3",
            "-m",
            "omni_train.sample",
            *sample_args(folder, clip, out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    frames, expected = read_video(out), read_video(one_rank["written"])
    assert frames.shape == expected.shape == (29, 64, 64, 3)
    assert psnr(frames, expected) >= MP4_PSNR


def _evaluate_in_rank(folder: Path, shards: str, out: Path) -> dict:
    """evaluate() in this rank (fidelity only), the generated clips recorded."""
    from omni_train.evaluation import harness
    from omni_train.evaluation.config import EvaluateConfig
    from omni_train.evaluation.suite import MetricsConfig

    generated = []
    generate = harness.generate_clip

    def recording(*args, **kwargs):
        video = generate(*args, **kwargs)
        generated.append(video)
        return video

    harness.generate_clip = recording
    path = harness.evaluate(
        EvaluateConfig(
            checkpoint=str(folder),
            shards=shards,
            out=str(out),
            num_clips=1,
            seconds=29 / 8,  # two segments
            sampling_steps=SAMPLING_STEPS,
            grid=False,
            wandb=False,
            metrics=MetricsConfig(enabled=["fidelity"]),
        )
    )
    return {"path": path, "generated": generated}


@pytest.mark.slow
def test_evaluation_on_3_ranks_scores_the_one_rank_generation(checkpoint, tmp_path):
    from data_pipelines.testing import build_sample_shards

    folder, _ = checkpoint
    shards = f"{build_sample_shards(tmp_path / 'corpus', num_clips=1)}/shards/*.tar"
    (one,) = run_ranks(_evaluate_in_rank, 1, folder, shards, tmp_path / "one")
    three = run_ranks(_evaluate_in_rank, 3, folder, shards, tmp_path / "three")
    assert [r["path"] for r in three] == [tmp_path / "three" / "eval.json", None, None]
    assert [r["generated"] for r in three[1:]] == [[None], [None]]  # ranks 1, 2 only helped
    (video,), (expected,) = three[0]["generated"], one["generated"]
    assert video.shape == expected.shape == (29, 64, 64, 3)
    assert np.abs(video.astype(int) - expected.astype(int)).max() <= FRAME_ATOL
    report = json.loads(three[0]["path"].read_text())
    expected_report = json.loads(one["path"].read_text())
    got = report["summary"]["generated"]["psnr"]["mean"]
    want = expected_report["summary"]["generated"]["psnr"]["mean"]
    assert got == pytest.approx(want, abs=1e-3)
