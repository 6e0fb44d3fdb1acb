"""CFG-parallel sampling speed-up on CPU ranks: one segment of the `small` model.

Every configuration samples the same segment with the same seed: the `small` preset (its
all-zero weights given random values, so every pass does real work), a 128x128 reference,
17 frames, task=audio with a caption, STEPS Euler steps that are all guided (three passes
each), in forked gloo ranks (omni_train.testing.run_ranks):

    1 rank,  1 thread          the floor: today's path, the three passes as one batch-3 forward
    1 rank,  2 / 3 threads     the same with this machine's cores / the three ranks' threads
    2 ranks, 1 thread each     CFG-parallel, the passes split 2 + 1
    3 ranks, 1 thread each     CFG-parallel, one pass per rank

It prints the median seconds of the segment's denoising (the Euler loop: the part CFG
parallelism splits, all-gathers included) and of the whole segment (encoders, denoising and
the VAE decode, which rank 0 alone runs), their speed-ups over the floor, and the largest
difference of the latents from the floor's. Ranks are processes: with fewer free cores than
ranks they share cores, and the speed-up cannot exceed the free cores (this project's
development machine has 2, shared).

    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from omni_train.testing import run_ranks  # noqa: E402

RESOLUTION = 128
FRAMES = 17
FPS = 25.0
STEPS = 8
REPEATS = 3
# (ranks, torch threads per rank); the first is the floor.
CONFIGS = ((1, 1), (1, 2), (1, 3), (2, 1), (3, 1))


def _sample_segment(threads: int) -> dict:
    """In a rank: REPEATS timed samplings of one segment after an untimed one."""
    import torch
    import torch.distributed as dist

    from omni_train.describe import model_preset
    from omni_train.diffusion import sampler
    from omni_train.diffusion.cfg_parallel import cfg_parallel_from_env
    from omni_train.diffusion.config import DiffusionConfig
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.testing import pretrained_like

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_preset("small")
    denoiser = pretrained_like(build_denoiser(cfg)).eval()
    encoders = build_frozen_encoders(cfg)
    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1
    audio = torch.randn(round(FRAMES / FPS * sampler.AUDIO_SAMPLE_RATE), generator=gen)
    # The default scales (3 down to 1.5) keep every step guided: three passes to deal.
    diffusion = DiffusionConfig(sampling_steps=STEPS)

    euler, denoising, latents, totals = sampler.euler_sample, [], [], []

    def timed_euler(*args, **kwargs):
        started = time.perf_counter()
        latents.append(euler(*args, **kwargs))
        denoising.append(time.perf_counter() - started)
        return latents[-1]

    sampler.euler_sample = timed_euler
    forward, forwards, forward_sums, last_call = denoiser.forward, [], [], {}

    def timed_forward(*args, **kwargs):
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        forwards.append(time.perf_counter() - started)
        last_call.update(args=args, kwargs=kwargs)
        return out

    denoiser.forward = timed_forward
    with cfg_parallel_from_env("cpu") as parallel, torch.no_grad():
        for steps in (1, *[STEPS] * REPEATS):  # the first, one step, untimed: a warm-up
            if parallel is not None:
                dist.barrier()
            started = time.perf_counter()
            sampler.generate_long_video(
                denoiser,
                encoders,
                ref,
                audio,
                "a person talking",
                FPS,
                FRAMES,
                FRAMES,
                replace(diffusion, sampling_steps=steps),
                torch.Generator().manual_seed(0),
                parallel=parallel,
            )
            totals.append(time.perf_counter() - started)
            forward_sums.append(sum(forwards))
            forwards.clear()
        passes = None if parallel is not None else batched_and_one_pass(forward, last_call)
    return {
        "denoise_s": statistics.median(denoising[1:]),
        "total_s": statistics.median(totals[1:]),
        "forward_s": statistics.median(forward_sums[1:]),
        "passes_s": passes,
        "latents": latents[-1].numpy(),
    }


def batched_and_one_pass(forward, call: dict, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of the last forward (the three passes batched) and of its first pass
    alone (what one rank of three runs), timed alternately so that load hits both alike."""
    import torch

    def first(value):
        if isinstance(value, dict):
            return {key: first(v) for key, v in value.items()}
        return value[:1] if isinstance(value, torch.Tensor) else value

    calls = (call["args"], [first(value) for value in call["args"]])
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for args, spent in zip(calls, times, strict=True):
            started = time.perf_counter()
            forward(*args, **call["kwargs"])
            spent.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    import numpy as np

    results = {}
    for ranks, threads in CONFIGS:
        results[ranks, threads] = run_ranks(_sample_segment, ranks, threads, timeout=1800)[0]
    floor = results[CONFIGS[0]]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"one segment of `small`: {RESOLUTION}x{RESOLUTION}, {FRAMES} frames, {STEPS} guided "
        f"steps (3 passes each); median of {REPEATS}; {os.cpu_count()} cores, load {load:.1f}"
    )
    print(
        f"{'ranks x threads':<16}{'denoise':>9}{'speed-up':>10}{'forward/step':>14}"
        f"{'wait/step':>11}{'segment':>9}{'speed-up':>10}{'max |latent diff|':>19}"
    )
    for (ranks, threads), result in results.items():
        diff = float(np.abs(result["latents"] - floor["latents"]).max())
        per_step, forward_per_step = result["denoise_s"] / STEPS, result["forward_s"] / STEPS
        print(
            f"{f'{ranks} x {threads}':<16}{result['denoise_s']:>8.2f}s"
            f"{floor['denoise_s'] / result['denoise_s']:>9.2f}x"
            f"{forward_per_step:>13.3f}s{per_step - forward_per_step:>10.3f}s"
            f"{result['total_s']:>8.2f}s{floor['total_s'] / result['total_s']:>9.2f}x"
            f"{diff:>19.1e}"
        )
    batched, alone = floor["passes_s"]
    print(
        f"1 thread, one process: the three passes batched {batched:.3f} s, one pass alone "
        f"{alone:.3f} s, so with a free core per rank 3 ranks could denoise up to "
        f"{batched / alone:.2f}x faster than the floor (less the all-gather)"
    )
    print("forward/step and wait/step are rank 0's; wait is the rest of a step: the all-gather")
    print("and waiting for the slowest rank (the ranks share the free cores)")


if __name__ == "__main__":
    main()
