"""Throughput figures: tokens and FLOPs per sample, MFU, peak memory.

MFU = model FLOPs per second / (ranks x peak FLOP/s per rank). The model FLOPs per sample
come from ``omni_train.models.flops.train_flops_per_sample`` (swap ``FLOPS_PER_SAMPLE`` to
count differently); the peak is ``trainer.peak_tflops`` or, when 0, the dense bf16 tensor
peak of a known CUDA GPU. CPU runs report no MFU unless a peak is given.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Sequence

import torch

from omni_train.models.config import ModelConfig
from omni_train.models.flops import token_counts, train_flops_per_sample

FLOPS_PER_SAMPLE: Callable[[ModelConfig, Sequence[int], int], int] = train_flops_per_sample

# Dense bf16 tensor-core TFLOP/s (no sparsity) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def detect_peak_tflops(configured: float) -> float | None:
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return tflops
    return None


def tokens_per_sample(model_cfg: ModelConfig, resolution: Sequence[int], num_frames: int) -> int:
    """Video-stream tokens the denoiser processes per sample (frames and reference)."""
    return token_counts(model_cfg, resolution, num_frames).video_tokens


def mfu(flops_per_sample: float, samples_per_s: float, ranks: int, peak_tflops: float) -> float:
    return flops_per_sample * samples_per_s / (ranks * peak_tflops * 1e12)


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: CUDA allocator figures on GPU, resident set on CPU."""
    if device.type == "cuda":
        return {
            "mem_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {"mem_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}
