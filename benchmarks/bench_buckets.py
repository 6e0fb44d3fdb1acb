"""Step time per (resolution x length) bucket, with equal batch sizes vs cost-budget ones.

The step is the denoiser's forward + backward (the `tiny` preset, fp32, CPU, every condition
on, text at the text encoder's max_length, as the FLOPs count it) on one batch of a bucket.
"before": every bucket at the configured batch size; "after": data.batch_by_cost=true with
data.cost_budget=auto (omni_train/data/bucket_cost.py: the costliest bucket keeps its batch
size, the others get floor(budget / their cost per sample)). The figure is the spread of the
per-bucket step times, max / min, before and after, both measured in the same run; next to
it, the spread the FLOPs predict (rounding the batch sizes down leaves some). The step times
are the CPU seconds of a one-thread step (the step's work: waiting for a core on a shared
machine is left out; wall-clock spreads are printed too), medians over rounds that run every
(bucket, batch size) once in turn, so a load change hits all of them alike.

    .venv/bin/python benchmarks/bench_buckets.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from omni_train.contracts import SPATIAL_STRIDE, TEMPORAL_STRIDE  # noqa: E402
from omni_train.data.bucket_cost import (  # noqa: E402
    bucket_costs,
    step_time_spread,
    with_cost_batch_sizes,
)
from omni_train.data.config import BucketConfig, DataConfig  # noqa: E402
from omni_train.describe import model_preset  # noqa: E402
from omni_train.models.denoiser import build_denoiser  # noqa: E402

MODEL = "tiny"
BATCH_SIZE = 8  # the configured batch size of every bucket ("before")
BUCKETS = [
    BucketConfig([64, 64], 17, BATCH_SIZE),
    BucketConfig([96, 96], 9, BATCH_SIZE),
    BucketConfig([48, 80], 33, BATCH_SIZE),
    BucketConfig([32, 32], 9, BATCH_SIZE),
]
WARMUP_ROUNDS = 1
TIMED_ROUNDS = 10
# One thread: its CPU time is the step's work, whatever else runs on this shared machine.
THREADS = 1


def denoiser_inputs(cfg, bucket: BucketConfig, batch: int) -> dict:
    height, width = bucket.resolution
    frames = bucket.num_frames
    latent_frames = 1 + (frames - 1) // TEMPORAL_STRIDE
    h, w = height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
    channels, text_tokens = cfg.vae.latent_channels, cfg.text_encoder.max_length
    return dict(
        noisy=torch.randn(batch, channels, latent_frames, h, w),
        timesteps=torch.rand(batch),
        text=torch.randn(batch, text_tokens, cfg.text_encoder.d_model),
        text_mask=torch.ones(batch, text_tokens, dtype=torch.bool),
        ref_latents=torch.randn(batch, channels, 1, h, w),
        audio_features=torch.randn(batch, frames, cfg.audio_encoder.feature_dim),
        pose_heatmaps=torch.rand(batch, cfg.pose_guider.num_keypoints, frames, height, width),
        active={c: torch.ones(batch, dtype=torch.bool) for c in ("text", "ref", "audio", "pose")},
    )


def step_seconds(model, inputs: dict) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one forward + backward."""
    cpu, wall = time.process_time(), time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return time.process_time() - cpu, time.perf_counter() - wall


def spreads(seconds: dict, costs: list[int], sizes: list[int]) -> tuple[float, float]:
    """(measured, FLOPs-predicted) step-time spread of the buckets at ``sizes``."""
    measured = step_time_spread([seconds[(i, n)] for i, n in enumerate(sizes)])
    return measured, step_time_spread([c * n for c, n in zip(costs, sizes, strict=True)])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    cfg = model_preset(MODEL)
    model = build_denoiser(cfg).train()
    data = DataConfig(shards="unused", buckets=BUCKETS, batch_by_cost=True)
    before = [b.batch_size for b in BUCKETS]
    after = [b.batch_size for b in with_cost_batch_sizes(data, cfg).buckets]
    costs = bucket_costs(cfg, BUCKETS)
    keys = list(dict.fromkeys([*enumerate(before), *enumerate(after)]))
    inputs = {(i, n): denoiser_inputs(cfg, BUCKETS[i], n) for i, n in keys}
    cpu: dict = {key: [] for key in keys}
    wall: dict = {key: [] for key in keys}
    for round_index in range(WARMUP_ROUNDS + TIMED_ROUNDS):
        for key in keys:
            cpu_s, wall_s = step_seconds(model, inputs[key])
            if round_index >= WARMUP_ROUNDS:
                cpu[key].append(cpu_s)
                wall[key].append(wall_s)
    step = {key: statistics.median(times) for key, times in cpu.items()}
    step_wall = {key: statistics.median(times) for key, times in wall.items()}
    print(
        f"model={MODEL}, denoiser forward + backward, fp32, {THREADS} thread, CPU seconds "
        f"(median of {TIMED_ROUNDS} rounds); budget auto = the costliest bucket x {BATCH_SIZE}"
    )
    print(
        f"{'bucket':>10} {'GFLOP/sample':>12} | {'batch':>5} {'step ms':>8} {'GFLOP/s':>7} | "
        f"{'batch':>5} {'step ms':>8} {'GFLOP/s':>7}"
    )
    for i, bucket in enumerate(BUCKETS):
        height, width = bucket.resolution
        cells = [
            f"{n:>5} {step[(i, n)] * 1e3:>8.1f} {costs[i] * n / step[(i, n)] / 1e9:>7.2f}"
            for n in (before[i], after[i])
        ]
        name = f"{height}x{width}x{bucket.num_frames}"
        print(f"{name:>10} {costs[i] / 1e9:>12.3f} | {cells[0]} | {cells[1]}")
    for label, seconds in (("CPU time", step), ("wall time", step_wall)):
        measured_before, flops_before = spreads(seconds, costs, before)
        measured_after, flops_after = spreads(seconds, costs, after)
        print(
            f"step-time spread (max/min), {label:>9}: equal batch sizes {measured_before:.2f} "
            f"-> cost-budget batch sizes {measured_after:.2f}  "
            f"(FLOPs predict {flops_before:.2f} -> {flops_after:.2f})"
        )


if __name__ == "__main__":
    main()
