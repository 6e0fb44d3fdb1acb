"""Denoiser speed and memory on this machine: the `small` preset's forward + backward.

Prints the achieved FLOP/s of a training step (model FLOPs from
omni_train.models.flops.train_flops_per_sample) as a fraction of this CPU's measured fp32
matmul peak (the best FLOP/s of a 1024^3 matmul in the same run: an upper bound a step cannot
reach, not a same-work baseline), and the memory of a step, with and without per-block
activation checkpointing: the peak of live tensor memory over forward + backward (gradients
included) and what the forward pass leaves saved for backward; and the VAE's peak memory for
a short and a long clip, whole versus in temporal chunks (chunked, it does not grow with the
length).
Memory comes from the profiler's allocation events, so it is exact and does not depend on the
machine's load; times swing between runs on a shared machine, so compare the fractions.

    .venv/bin/python benchmarks/bench_model.py
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from omni_train.describe import model_preset  # noqa: E402
from omni_train.models.denoiser import build_denoiser  # noqa: E402
from omni_train.models.flops import train_flops_per_sample  # noqa: E402
from omni_train.models.vae import CausalVAE  # noqa: E402

RESOLUTION = (128, 128)
NUM_FRAMES = 9
BATCH = 1
TEXT_TOKENS = 64
WARMUP_STEPS = 1
TIMED_STEPS = 3
MATMUL_SIZE = 1024
VAE_RESOLUTION = (64, 64)
VAE_FRAMES = (17, 49)
# Batch 2: for batch 1 and small inputs torch's CPU conv3d takes an im2col path whose scratch
# buffer would dominate the figure (it picks oneDNN for batches > 1).
VAE_BATCH = 2
MIB = 2**20


def matmul_peak_flops_per_s(size: int = MATMUL_SIZE, repeats: int = 10) -> float:
    """Best of ``repeats`` fp32 (size x size) @ (size x size) products: this CPU's peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_inputs(cfg, batch: int) -> dict:
    height, width = RESOLUTION
    latent_frames = 1 + (NUM_FRAMES - 1) // 4
    channels = cfg.vae.latent_channels
    return dict(
        noisy=torch.randn(batch, channels, latent_frames, height // 8, width // 8),
        timesteps=torch.rand(batch),
        text=torch.randn(batch, TEXT_TOKENS, cfg.text_encoder.d_model),
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        ref_latents=torch.randn(batch, channels, 1, height // 8, width // 8),
        audio_features=torch.randn(batch, NUM_FRAMES, cfg.audio_encoder.feature_dim),
        pose_heatmaps=torch.rand(batch, cfg.pose_guider.num_keypoints, NUM_FRAMES, height, width),
        active={c: torch.ones(batch, dtype=torch.bool) for c in ("text", "ref", "audio", "pose")},
    )


def live_bytes(run) -> tuple[int, int]:
    """(peak, final) bytes of tensor memory allocated and not yet freed while ``run()`` runs."""
    with torch.profiler.profile(profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live


def measure(checkpointing: bool) -> tuple[float, int, int]:
    """(median step seconds, peak step bytes, bytes saved by forward for backward)."""
    torch.manual_seed(0)
    small = model_preset("small")
    model_cfg = replace(small, dit=replace(small.dit, gradient_checkpointing=checkpointing))
    model = build_denoiser(model_cfg).train()
    inputs = model_inputs(model_cfg, BATCH)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs).square().mean().backward()

    times = []
    for index in range(WARMUP_STEPS + TIMED_STEPS):
        start = time.perf_counter()
        step()
        if index >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    peak, _ = live_bytes(lambda: model(**inputs).square().mean().backward())
    model.zero_grad(set_to_none=True)
    kept: list[torch.Tensor] = []
    _, saved = live_bytes(lambda: kept.append(model(**inputs).square().mean()))
    return statistics.median(times), peak, saved


def vae_peaks(chunk_frames: int, frames: int) -> tuple[int, int]:
    """Peak live bytes of encoding, then decoding, one clip with the `small` preset's VAE."""
    vae = CausalVAE(replace(model_preset("small").vae, chunk_frames=chunk_frames)).eval()
    video = torch.rand(VAE_BATCH, 3, frames, *VAE_RESOLUTION) * 2 - 1
    latent_shape = (VAE_BATCH, vae.cfg.latent_channels, 1 + (frames - 1) // 4)
    latents = torch.randn(*latent_shape, *(v // 8 for v in VAE_RESOLUTION))

    # Pieces are dropped as they come, as a caller streaming them to disk would.
    def encode() -> None:
        all(True for _ in vae.encode_chunks(video))

    def decode() -> None:
        all(True for _ in vae.decode_chunks(latents))

    with torch.no_grad():
        encode(), decode()  # warm-up: oneDNN's per-shape scratch buffers stay out of the peak
        return live_bytes(encode)[0], live_bytes(decode)[0]


def main() -> None:
    flops = train_flops_per_sample(model_preset("small"), RESOLUTION, NUM_FRAMES, TEXT_TOKENS)
    flops *= BATCH
    matmul_peak = matmul_peak_flops_per_s()
    print(
        f"model=small, batch {BATCH}, {RESOLUTION[0]}x{RESOLUTION[1]}, {NUM_FRAMES} frames, "
        f"{TEXT_TOKENS} text tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(f"fp32 matmul peak ({MATMUL_SIZE}^3, best of 10): {matmul_peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs per step (fwd+bwd): {flops / 1e9:.2f} GFLOP")
    weights = sum(
        p.numel() * p.element_size() for p in build_denoiser(model_preset("small")).parameters()
    )
    print(f"weights {weights / MIB:.0f} MiB (the step's gradients are as large, inside its peak)")
    for checkpointing in (False, True):
        seconds, peak, saved = measure(checkpointing)
        matmul_peak = max(matmul_peak, matmul_peak_flops_per_s())
        achieved = flops / seconds
        label = "per-block checkpointing" if checkpointing else "no checkpointing"
        print(
            f"{label:>24}: step {seconds:.2f} s, {achieved / 1e9:.1f} GFLOP/s = "
            f"{achieved / matmul_peak:.3f} of the matmul peak; "
            f"peak memory per step {peak / MIB:.0f} MiB, saved for backward {saved / MIB:.1f} MiB"
        )
    print(
        f"VAE (small preset), batch {VAE_BATCH} at {VAE_RESOLUTION[0]}x{VAE_RESOLUTION[1]}, "
        "peak memory encode / decode, whole clip vs chunked (chunk_frames=9):"
    )
    for frames in VAE_FRAMES:
        whole, chunked = vae_peaks(0, frames), vae_peaks(9, frames)
        print(
            f"  {frames:>3} frames: whole {whole[0] / MIB:.0f} / {whole[1] / MIB:.0f} MiB, "
            f"chunked {chunked[0] / MIB:.0f} / {chunked[1] / MIB:.0f} MiB"
        )
    print(
        "(fractions of this CPU's measured fp32 matmul peak, the best seen in this run: "
        f"{matmul_peak / 1e9:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
