"""PSNR and SSIM of a candidate video against the real clip (self-reenactment fidelity)."""

from __future__ import annotations

import numpy as np

from omni_train.evaluation.image import SSIM_METHOD, video_psnr, video_ssim
from omni_train.evaluation.measurement import ClipInputs, MetricValue

PSNR_METHOD = "PSNR in dB over all RGB pixels of the clip (MSE pooled over frames), uint8 range"


class FidelityMetric:
    name = "fidelity"

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        if video.shape != clip.real.shape:
            reason = f"candidate shape {video.shape} differs from the real clip's {clip.real.shape}"
            return {
                "psnr": MetricValue.missing(PSNR_METHOD, reason),
                "ssim": MetricValue.missing(SSIM_METHOD, reason),
            }
        psnr = video_psnr(video, clip.real)
        return {
            # Identical clips have an infinite PSNR, which JSON cannot hold.
            "psnr": MetricValue(psnr, PSNR_METHOD)
            if np.isfinite(psnr)
            else MetricValue.missing(PSNR_METHOD, "infinite: the candidate equals the real clip"),
            "ssim": MetricValue(
                video_ssim(video, clip.real), f"mean per-frame SSIM, {SSIM_METHOD}"
            ),
        }
