"""Throughput figures: tokens and FLOPs per sample, MFU, peak memory.

MFU = model FLOPs per second / (ranks x peak FLOP/s per rank). The model FLOPs per sample
come from ``omni_train.models.training_cost.train_flops_per_sample_of`` (the closed form of
flops.py for this project's MMDiT trained in full, else counted on the meta device for the
backbone family and fine-tuning mode; swap ``flops_per_sample_fn`` to count differently), at
the padded text length each sample actually ran with. The peak is
``trainer.peak_tflops`` or, when 0, the dense peak of a known CUDA GPU at the run's precision
(``peak_for_precision``). CPU runs report no MFU unless a peak is given.
"""

from __future__ import annotations

import re
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from omni_train.models.config import ModelConfig
from omni_train.models.flops import token_counts
from omni_train.models.training_cost import train_flops_per_sample_of
from omni_train.trainer.ds_config import resolve_precision

# (model config, resolution, pixel frames, text tokens, fine-tuning mode, LoRA rank) -> FLOPs
flops_per_sample_fn: Callable[..., int] = train_flops_per_sample_of


@dataclass(frozen=True)
class PeakTflops:
    """Dense (no 2:4 sparsity) TFLOP/s of one GPU, from NVIDIA's datasheets."""

    bf16: float  # bf16 / fp16 tensor cores
    tf32: float  # fp32 matmuls on TF32 tensor cores
    fp32: float  # plain fp32 (CUDA cores)


# Keyed by words of torch.cuda.get_device_name(): a device takes the entry all of whose words
# are words of its name, the entry with most words winning ("NVIDIA H100 NVL" is "H100 NVL",
# "NVIDIA H100 80GB HBM3" is "H100", i.e. SXM; "NVIDIA L40S" is never "L4").
GPU_PEAKS: dict[str, PeakTflops] = {
    "H100": PeakTflops(bf16=989.0, tf32=494.5, fp32=67.0),  # SXM
    "H100 PCIe": PeakTflops(bf16=756.0, tf32=378.0, fp32=51.0),
    "H100 NVL": PeakTflops(bf16=835.0, tf32=417.5, fp32=60.0),
    "H200": PeakTflops(bf16=989.0, tf32=494.5, fp32=67.0),  # SXM
    "H200 NVL": PeakTflops(bf16=835.0, tf32=417.5, fp32=60.0),
    "GH200": PeakTflops(bf16=989.0, tf32=494.5, fp32=67.0),
    "H800": PeakTflops(bf16=989.0, tf32=494.5, fp32=67.0),  # SXM
    "H800 PCIe": PeakTflops(bf16=756.0, tf32=378.0, fp32=51.0),
    "A100": PeakTflops(bf16=312.0, tf32=156.0, fp32=19.5),  # SXM and PCIe alike
    "A800": PeakTflops(bf16=312.0, tf32=156.0, fp32=19.5),
    "L40S": PeakTflops(bf16=362.0, tf32=183.0, fp32=91.6),
    "L40": PeakTflops(bf16=181.0, tf32=90.5, fp32=90.5),
    "L4": PeakTflops(bf16=121.0, tf32=60.0, fp32=30.3),
    "A10G": PeakTflops(bf16=70.0, tf32=35.0, fp32=31.5),  # AWS's figures (no NVIDIA sheet)
}


def _words(name: str) -> set[str]:
    return set(re.split(r"[\s_-]+", name.upper())) - {""}


def gpu_peak(device_name: str) -> PeakTflops | None:
    """The GPU_PEAKS entry of a CUDA device name (or a key itself), None for an unknown GPU."""
    words = _words(device_name)
    matches = [key for key in GPU_PEAKS if _words(key) <= words]
    if not matches:
        return None
    return GPU_PEAKS[max(matches, key=lambda key: len(_words(key)))]


def fp32_matmuls_use_tf32() -> bool:
    """Whether CUDA fp32 matmuls run on TF32 tensor cores in this process (set by
    ``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.fp32_precision
    = "tf32"`` or the older ``allow_tf32`` flag; the trainer itself sets none of them)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9
        return bool(matmul.allow_tf32)
    precision = matmul.fp32_precision
    if precision == "none":  # not set for CUDA matmuls: the backend-wide setting applies
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def peak_for_precision(peak: PeakTflops, precision: str, tf32: bool) -> float:
    """The peak a run at ``precision`` (trainer.precision, resolved: "bf16" or "fp32") can
    reach: bf16 runs the bf16 tensor-core peak; fp32 runs the TF32 tensor-core peak when fp32
    matmuls use TF32 (``tf32``), else the plain fp32 peak. Matmuls decide because they are
    nearly all the model FLOPs (cuDNN's TF32 convolutions, on by default, are the pose
    guider's share only)."""
    if precision == "bf16":
        return peak.bf16
    if precision == "fp32":
        return peak.tf32 if tf32 else peak.fp32
    raise ValueError(f"precision {precision!r} has no peak: use 'bf16' or 'fp32'")


def detect_peak_tflops(configured: float, precision: str) -> float | None:
    """``configured`` when > 0, else the peak of this process's CUDA GPU at ``precision``
    (trainer.precision; "auto" is bf16 on CUDA); None on CPU or an unknown GPU."""
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return None
    peak = gpu_peak(torch.cuda.get_device_name())
    if peak is None:
        return None
    resolved = resolve_precision(precision, cuda=True)
    return peak_for_precision(peak, resolved, fp32_matmuls_use_tf32())


def tokens_per_sample(model_cfg: ModelConfig, resolution: Sequence[int], num_frames: int) -> int:
    """Video-stream tokens the denoiser processes per sample (frames and reference)."""
    return token_counts(model_cfg, resolution, num_frames).video_tokens


def flops_of_samples(
    model_cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: Sequence[int],
    finetune_mode: str = "full",
    lora_rank: int | None = None,
) -> int:
    """Training FLOPs of the samples that ran, one entry of ``text_tokens`` per sample: the
    padded caption length of its batch (batches pad to their longest caption, not to
    ``max_length``), for the run's trainer.finetune mode and LoRA rank."""
    per_length = {
        length: flops_per_sample_fn(
            model_cfg, resolution, num_frames, length, finetune_mode, lora_rank
        )
        for length in set(text_tokens)
    }
    return sum(per_length[length] for length in text_tokens)


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
