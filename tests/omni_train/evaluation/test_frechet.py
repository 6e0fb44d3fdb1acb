from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from omni_train.evaluation.frechet import (
    FIDMetric,
    FVDMetric,
    frechet_distance,
    gaussian_stats,
)
from omni_train.evaluation.suite import MetricsConfig


def _commuting_pair(rng):
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    d1, d2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 16.0, 1.0])
    return q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T, d1, d2


@pytest.mark.parametrize("scipy_present", [True, False])
def test_frechet_distance_matches_the_closed_form(scipy_present, monkeypatch):
    if not scipy_present:
        monkeypatch.setitem(sys.modules, "scipy", None)  # the eigen-decomposition route
    elif pytest.importorskip("scipy") is None:
        return
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(9.0 + 1.0)
    # Commuting covariances: |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2.
    s1, s2, d1, d2 = _commuting_pair(np.random.default_rng(0))
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 5.0 + np.square(np.sqrt(d1) - np.sqrt(d2)).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_names_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit one dimension"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class _ChannelMeans(torch.nn.Module):
    """Stands in for the Inception TorchScript: (N, 3, H, W) uint8 -> per-channel means."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or not return_features:
            raise ValueError("expected uint8 images and return_features=True")
        return x.float().mean(dim=(2, 3))


class _FrameMeans(torch.nn.Module):
    """Stands in for the I3D TorchScript: (N, 3, T, H, W) uint8 -> per-frame channel means."""

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        if x.dtype != torch.uint8 or not (rescale and resize and return_features):
            raise ValueError("expected uint8 clips and rescale/resize/return_features")
        return x.float().mean(dim=(3, 4)).flatten(1)


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frechet")
    torch.jit.script(_ChannelMeans()).save(str(folder / "inception.pt"))
    torch.jit.script(_FrameMeans()).save(str(folder / "i3d.pt"))
    return MetricsConfig(
        inception_weights=str(folder / "inception.pt"),
        i3d_weights=str(folder / "i3d.pt"),
        fid_frames_per_video=0,
        fvd_frames=2,
    )


def _videos(seed: int, count: int, frames: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 6, 5, 3), dtype=np.uint8) for _ in range(count)]


def test_fid_is_the_frechet_distance_of_the_frame_features(extractors):
    generated, real = _videos(0, 3), _videos(1, 3)

    def stats(videos):
        return gaussian_stats(np.concatenate([v.mean(axis=(1, 2)) for v in videos]))

    out = FIDMetric(extractors)(generated, real, fps=25.0)["fid"]
    assert out.value == pytest.approx(frechet_distance(*stats(generated), *stats(real)))
    assert out.value > 1.0 and not out.higher_is_better and "return_features" in out.method
    assert FIDMetric(extractors)(real, real, 25.0)["fid"].value == pytest.approx(0.0, abs=1e-6)


def test_fvd_uses_clips_of_consecutive_frames(extractors):
    generated, real = _videos(2, 2), _videos(3, 2)

    def stats(videos):  # two clips of 2 frames per 4-frame video; features (C, T) flattened
        clips = [v[s : s + 2].mean(axis=(1, 2)).T.reshape(-1) for v in videos for s in (0, 2)]
        return gaussian_stats(np.stack(clips))

    out = FVDMetric(extractors)(generated, real, fps=25.0)["fvd"]
    assert out.value == pytest.approx(frechet_distance(*stats(generated), *stats(real)))


def test_without_weights_or_samples_frechet_is_not_measured(extractors, tmp_path):
    for metric, key in ((FIDMetric(MetricsConfig()), "fid"), (FVDMetric(MetricsConfig()), "fvd")):
        out = metric(_videos(0, 3), _videos(1, 3), 25.0)[key]
        assert out.value is None and "not measured" in out.reason
    missing = FIDMetric(MetricsConfig(inception_weights=str(tmp_path / "none.pt")))
    out = missing(_videos(0, 3), _videos(1, 3), 25.0)["fid"]
    assert out.value is None and "is not a file" in out.reason
    one = FVDMetric(extractors)(_videos(0, 1, frames=3), _videos(1, 3), 25.0)["fvd"]
    assert one.value is None and ">= 2" in one.reason
