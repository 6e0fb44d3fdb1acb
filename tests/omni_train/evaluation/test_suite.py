"""Every registered metric builds from the default config and labels what it cannot measure."""

from __future__ import annotations

import numpy as np
import pytest

from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import (
    CLIP_METRICS,
    SET_METRICS,
    MetricsConfig,
    build_clip_metrics,
    build_set_metrics,
)


def test_registry_builds_every_metric_by_name():
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is not installed")
    clip_metrics = build_clip_metrics(MetricsConfig())
    assert [m.name for m in clip_metrics] == list(CLIP_METRICS)
    assert [m.name for m in build_set_metrics(MetricsConfig())] == list(SET_METRICS)
    only = build_clip_metrics(MetricsConfig(enabled=["identity", "fid"]))
    assert [m.name for m in only] == ["identity"]
    with pytest.raises(ValueError, match="unknown metric"):
        build_clip_metrics(MetricsConfig(enabled=["sync_c"]))


def test_a_faceless_clip_without_weights_is_labelled_never_zero():
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is not installed")
    pytest.importorskip("mediapipe", reason="mediapipe is not installed")
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    clip = ClipInputs(key="noise", real=video, reference=video[0], fps=25.0,
                      audio=(0.1 * rng.standard_normal(5120)).astype(np.float32),
                      segments=[(0, 4), (4, 8)])  # fmt: skip
    results = {}
    for metric in build_clip_metrics(MetricsConfig()):
        results.update(metric(video, clip))
    for metric in build_set_metrics(MetricsConfig()):
        results.update(metric([video, video], [video, video], 25.0))
    assert all(isinstance(v, MetricValue) and v.method for v in results.values())
    missing = {k for k, v in results.items() if v.value is None}
    assert all(results[k].reason for k in missing)
    assert missing == {
        "psnr",  # the candidate is the real clip: infinite
        # noise has no face, not even in the reference
        "identity_distance", "identity_face_fraction", "identity_drift", "drift_identity",
        "hkc", "hkv",  # nor hands
        "sync_c", "sync_d", "sync_offset", "lipsync_proxy",  # no weights; no mouth
        "fid", "fvd",  # no weights
    }  # fmt: skip
    assert "no face detected in the reference" in results["identity_distance"].reason
    assert results["hand_fraction"].value == 0.0
    first, last = results["drift_color"].series
    assert results["drift_color"].value == pytest.approx(last - first)
