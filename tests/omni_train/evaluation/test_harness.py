"""Running metrics safely, candidates, clip lengths and segments: no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from omni_train.evaluation import suite
from omni_train.evaluation.baselines import candidate_videos
from omni_train.evaluation.clips import frames_at_rate
from omni_train.evaluation.config import EvaluateConfig
from omni_train.evaluation.fidelity import FidelityMetric
from omni_train.evaluation.harness import generated_segments
from omni_train.evaluation.image import psnr_from_mse
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.scoring import LoadedMetric, load_metrics, resolve, score_clip
from omni_train.evaluation.suite import MetricsConfig


def clip_inputs(frames=6, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)
    return ClipInputs("k", real, real[0], 8.0, segments=[(0, 5), (5, 9)])


class Lengths:
    """Records the frames and segments it is given."""

    name = "lengths"

    def __init__(self, whole=False):
        self.whole_generation = whole
        self.seen = []

    def __call__(self, video, clip):
        self.seen.append((len(video), clip.segments))
        return {"frames": MetricValue(float(len(video)), "count")}


class Boom:
    name = "boom"

    def __init__(self):
        self.calls = 0

    def __call__(self, video, clip):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("no face model")
        return {
            "a": MetricValue(1.0, "method a", higher_is_better=False),
            "b": MetricValue(float("nan"), "method b"),
        }


def test_a_metric_that_raises_is_none_with_the_reason_under_its_keys():
    clip = clip_inputs()
    videos = {"generated": clip.real, "real": clip.real, "static_reference": clip.real}
    outcomes, seconds = score_clip([LoadedMetric("boom", Boom())], videos, clip)
    assert set(seconds) == {"boom"}
    row = resolve([outcomes])[0]
    assert row["generated"]["a"] == MetricValue(1.0, "method a", higher_is_better=False)
    failed = row["real"]
    assert set(failed) == {"a", "b"}
    assert failed["a"].value is None and failed["a"].higher_is_better is False
    assert failed["a"].reason == "boom: raised RuntimeError: no face model"
    assert failed["a"].method == "method a"
    # a non-finite value is not measured either
    assert (
        row["generated"]["b"].value is None and row["generated"]["b"].reason == "not finite (nan)"
    )


def test_a_metric_that_cannot_be_loaded_is_none_with_the_reason(monkeypatch):
    monkeypatch.setitem(suite.CLIP_METRICS, "fidelity", "omni_train.evaluation.nowhere:Nope")
    (loaded,) = load_metrics(MetricsConfig(enabled=["fidelity"]), "clip")
    assert loaded.metric is None and "could not be loaded: ModuleNotFoundError" in loaded.error
    clip = clip_inputs()
    outcomes, _ = score_clip([loaded], {"generated": clip.real}, clip)
    (value,) = resolve([outcomes])[0]["generated"].values()
    assert value.value is None and value.reason.startswith("fidelity: could not be loaded")


def test_candidates_are_cut_to_the_real_clip_unless_a_metric_scores_the_whole_generation():
    clip = clip_inputs(frames=6)
    generated = np.zeros((9, 16, 16, 3), np.uint8)
    videos = candidate_videos(generated, clip.real, clip.reference)
    overlap, whole = Lengths(), Lengths(whole=True)
    score_clip([LoadedMetric("o", overlap), LoadedMetric("w", whole)], videos, clip)
    assert overlap.seen == [(6, [(0, 5), (5, 6)])] * 3
    assert whole.seen == [(9, [(0, 5), (5, 9)]), (6, [(0, 5), (5, 6)]), (9, [(0, 5), (5, 9)])]


def test_baselines_score_as_computed_by_hand():
    clip = clip_inputs(frames=4)
    videos = candidate_videos(clip.real[::-1].copy(), clip.real, clip.reference)
    assert (videos["static_reference"] == clip.real[0]).all()
    outcomes, _ = score_clip([LoadedMetric("fidelity", FidelityMetric())], videos, clip)
    row = resolve([outcomes])[0]
    assert row["real"]["psnr"].value is None and "infinite" in row["real"]["psnr"].reason
    assert row["real"]["ssim"].value == 1.0
    diff = videos["static_reference"].astype(np.float64) - clip.real.astype(np.float64)
    expected = 10 * np.log10(255.0**2 / np.mean(diff**2))
    assert row["static_reference"]["psnr"].value == pytest.approx(expected, rel=1e-12)
    assert psnr_from_mse(float(np.mean((diff / 255) ** 2))) == pytest.approx(expected)


def test_clip_length_at_the_run_rate_matches_the_decoder_resampling():
    assert frames_at_rate(75, 25.0, 8.0) == 24  # 3 s: frames 0 .. 23 -> source 0 .. 72
    assert frames_at_rate(120, 29.97, 8.0) == 32
    assert frames_at_rate(24, 8.0, 8.0) == 24
    assert frames_at_rate(4, 25.0, 8.0) == 2  # frame 1 -> source round(3.125) = 3, the last
    for clip_frames, clip_fps in ((75, 25.0), (120, 29.97), (10, 30.0), (4, 25.0)):
        n = frames_at_rate(clip_frames, clip_fps, 8.0)
        assert round((n - 1) * clip_fps / 8.0) <= clip_frames - 1 < round(n * clip_fps / 8.0)


def test_segments_cover_the_generation_once():
    assert generated_segments(17, 17, 5) == [(0, 17)]
    assert generated_segments(24, 17, 5) == [(0, 17), (17, 24)]
    assert generated_segments(40, 17, 5) == [(0, 17), (17, 29), (29, 40)]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"task": "video"}, "task="),
        ({"num_clips": 0}, "num_clips="),
        ({"seconds": -1.0}, "seconds="),
        ({"metrics": MetricsConfig(enabled=["psnr"])}, "metrics.enabled"),
        ({"metrics": MetricsConfig(syncnet_weights="/nowhere/s.pt")}, "metrics.syncnet_weights"),
    ],
)
def test_bad_config_values_fail_naming_the_key(overrides, key):
    cfg = EvaluateConfig(checkpoint="run", shards="s/*.tar", **overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()
