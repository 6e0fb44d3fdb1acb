"""FID (frames) and FVD (clips): Frechet distances between feature Gaussians.

d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. The matrix square root is
``scipy.linalg.sqrtm`` when scipy is installed (as the public FID/FVD code computes it), else
the symmetric route tr((S1^(1/2) S2 S1^(1/2))^(1/2)) by eigen-decomposition, which has the same
trace for covariance matrices.

Feature extractors are TorchScript files from local paths (nothing downloads):
- FID: NVlabs' ``inception-2015-12-05.pt`` (StyleGAN2-ADA / StyleGAN3
  ``metrics/frechet_inception_distance.py``): called as ``model(x, return_features=True)``
  on uint8 RGB images (N, 3, H, W) in their own size; it resizes to 299 and scales to [-1, 1]
  itself and returns the 2048-d pool3 features.
- FVD: StyleGAN-V's ``i3d_torchscript.pt`` (``src/metrics/frechet_video_distance.py``):
  ``model(x, rescale=True, resize=True, return_features=True)`` on uint8 RGB clips
  (N, 3, T, H, W) of ``fvd_frames`` consecutive frames (16 there), returning the 400-d
  pre-softmax features; videos shorter than that are discarded, as there.
Without weights the values are None ("not measured"), never 0. Each set needs >= 2 samples
(a covariance of one sample is undefined).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omni_train.evaluation.faces import sample_indices
from omni_train.evaluation.measurement import MetricValue
from omni_train.evaluation.suite import MetricsConfig

FEATURE_BATCH = 16


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2."""
    try:
        import scipy.linalg
    except ImportError:
        scipy = None
    if scipy is not None:
        root = scipy.linalg.sqrtm(s1 @ s2)
        return float(np.real(np.trace(root)))
    w1, v1 = np.linalg.eigh(s1)
    half = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    inner = np.linalg.eigvalsh(half @ s2 @ half)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != 2 * mu1.shape:
        raise ValueError(
            f"frechet_distance: means {mu1.shape}, {mu2.shape} and covariances "
            f"{sigma1.shape}, {sigma2.shape} do not fit one dimension"
        )
    mean_term = float(np.square(mu1 - mu2).sum())
    return mean_term + float(np.trace(sigma1) + np.trace(sigma2)) - 2 * _sqrtm_trace(sigma1, sigma2)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, as np.cov) covariance of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class TorchScriptFeatures:
    """A TorchScript feature extractor from a local path, called with fixed keyword flags."""

    def __init__(self, weights: str, option: str, flags: dict[str, bool]) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"metrics.{option}={weights} is not a file: give a local TorchScript "
                "feature extractor, or leave it empty to report 'not measured'"
            )
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.flags = flags
        self.name = path.name

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """uint8 batch (N, 3, ...) -> (N, D) float64 features."""
        out = [
            self.model(torch.from_numpy(np.ascontiguousarray(batch[i : i + FEATURE_BATCH])),
                       **self.flags).double().flatten(1)
            for i in range(0, len(batch), FEATURE_BATCH)
        ]  # fmt: skip
        return torch.cat(out).numpy()


class _FrechetMetric:
    name = ""
    key = ""
    option = ""
    flags: dict[str, bool] = {}
    unit = ""

    def __init__(self, cfg: MetricsConfig | None = None) -> None:
        self.cfg = cfg or MetricsConfig()
        weights = getattr(self.cfg, self.option)
        self.extractor, self.reason = None, None
        self.method = f"{self.key.upper()}: no feature extractor"
        if not weights:
            self.reason = f"not measured: metrics.{self.option} is empty (no local weights)"
            return
        try:
            self.extractor = TorchScriptFeatures(weights, self.option, self.flags)
            self.method = self._method(self.extractor.name)
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            self.reason = f"not measured: {str(err).splitlines()[0]}"

    def _method(self, weights_name: str) -> str:
        raise NotImplementedError

    def _samples(self, video: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, ...) samples of one (T, H, W, 3) video."""
        raise NotImplementedError

    def __call__(
        self, videos: list[np.ndarray], reals: list[np.ndarray], fps: float
    ) -> dict[str, MetricValue]:
        if self.extractor is None:
            return {self.key: MetricValue.missing(self.method, self.reason, False)}
        sets = []
        for label, group in (("generated", videos), ("real", reals)):
            samples = [s for v in group for s in self._samples(v)]
            if len(samples) < 2:
                reason = (f"{len(samples)} {self.unit} in the {label} set; a covariance needs "
                          ">= 2")  # fmt: skip
                return {self.key: MetricValue.missing(self.method, reason, False)}
            sets.append(gaussian_stats(self.extractor(np.stack(samples))))
        (mu1, s1), (mu2, s2) = sets
        return {self.key: MetricValue(frechet_distance(mu1, s1, mu2, s2), self.method,
                                      higher_is_better=False)}  # fmt: skip


class FIDMetric(_FrechetMetric):
    name = "fid"
    key = "fid"
    option = "inception_weights"
    flags = {"return_features": True}
    unit = "frames"

    def _method(self, weights_name: str) -> str:
        n = self.cfg.fid_frames_per_video or "all"
        return (f"FID over frames ({n} per video, evenly spaced), TorchScript {weights_name} "
                "called with return_features=True on uint8 RGB (N, 3, H, W) as in NVlabs' "
                "FID code; Frechet distance in float64")  # fmt: skip

    def _samples(self, video: np.ndarray) -> np.ndarray:
        frames = video[sample_indices(len(video), self.cfg.fid_frames_per_video)]
        return frames.transpose(0, 3, 1, 2)


class FVDMetric(_FrechetMetric):
    name = "fvd"
    key = "fvd"
    option = "i3d_weights"
    flags = {"rescale": True, "resize": True, "return_features": True}
    unit = "clips"

    def _method(self, weights_name: str) -> str:
        return (f"FVD over non-overlapping clips of {self.cfg.fvd_frames} consecutive frames, "
                f"TorchScript {weights_name} called with rescale=True, resize=True, "
                "return_features=True on uint8 RGB (N, 3, T, H, W) as in StyleGAN-V's FVD; "
                "Frechet distance in float64")  # fmt: skip

    def _samples(self, video: np.ndarray) -> np.ndarray:
        n = self.cfg.fvd_frames
        clips = [video[s : s + n] for s in range(0, len(video) - n + 1, n)]
        if not clips:
            return np.zeros((0, 3, n, *video.shape[1:3]), np.uint8)
        return np.stack(clips).transpose(0, 4, 1, 2, 3)
