"""MFU's parts: the FLOPs of the samples that ran and the peak of the GPU at the run's precision."""

from __future__ import annotations

import pytest
import torch

from omni_train.models.config import ModelConfig
from omni_train.models.flops import train_flops_per_sample
from omni_train.trainer import throughput
from omni_train.trainer.throughput import (
    GPU_PEAKS,
    detect_peak_tflops,
    flops_of_samples,
    gpu_peak,
    peak_for_precision,
)


def test_every_listed_gpu_maps_to_its_own_peak():
    for name, peak in GPU_PEAKS.items():
        assert gpu_peak(name) is peak, name
        assert gpu_peak(f"NVIDIA {name}") is peak, name


@pytest.mark.parametrize(
    ("device_name", "bf16"),
    [
        # NVIDIA's dense (non-sparse) bf16 tensor-core figures.
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_device_names_find_their_own_gpu(device_name, bf16):
    assert gpu_peak(device_name).bf16 == bf16


def test_unknown_gpus_have_no_peak():
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None
    assert gpu_peak("Tesla T4") is None


def test_tensor_core_peaks_are_dense_and_differ_by_precision():
    # NVIDIA's sheets: TF32 is half the bf16 tensor rate (both dense); plain FP32 is far lower.
    expected = {"H100": 67.0, "H100 PCIe": 51.0, "H100 NVL": 60.0, "A100": 19.5}
    for name, fp32 in expected.items():
        peak = GPU_PEAKS[name]
        assert peak.tf32 == peak.bf16 / 2 and peak.fp32 == fp32, name


def test_the_peak_follows_the_precision():
    nvl = GPU_PEAKS["H100 NVL"]
    assert peak_for_precision(nvl, "bf16", tf32=False) == 835.0
    assert peak_for_precision(nvl, "bf16", tf32=True) == 835.0
    assert peak_for_precision(nvl, "fp32", tf32=True) == 417.5
    assert peak_for_precision(nvl, "fp32", tf32=False) == 60.0
    with pytest.raises(ValueError, match="'fp16' has no peak"):
        peak_for_precision(nvl, "fp16", tf32=False)


def test_detected_peak_uses_the_run_precision_and_tf32_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 NVL")
    assert detect_peak_tflops(0.0, "bf16") == 835.0
    assert detect_peak_tflops(0.0, "auto") == 835.0  # auto is bf16 on CUDA
    assert detect_peak_tflops(0.0, "fp32") == 60.0
    assert detect_peak_tflops(3.0, "fp32") == 3.0  # trainer.peak_tflops wins
    monkeypatch.setattr(throughput, "fp32_matmuls_use_tf32", lambda: True)
    assert detect_peak_tflops(0.0, "fp32") == 417.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA GeForce RTX 4090")
    assert detect_peak_tflops(0.0, "bf16") is None


def test_tf32_is_read_from_torchs_matmul_setting():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the allow_tf32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert throughput.fp32_matmuls_use_tf32()
        matmul.fp32_precision = "ieee"
        assert not throughput.fp32_matmuls_use_tf32()
    finally:
        matmul.fp32_precision = before


def test_flops_count_each_sample_at_the_text_length_it_ran():
    cfg = ModelConfig()
    args = (cfg, (64, 64), 17)
    ran = flops_of_samples(*args, [5, 5, 9])
    assert ran == 2 * train_flops_per_sample(*args, 5) + train_flops_per_sample(*args, 9)
    assert ran < 3 * train_flops_per_sample(*args)  # max_length (64) would overcount
