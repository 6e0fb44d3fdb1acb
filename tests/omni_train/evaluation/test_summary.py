"""Means and 95 % intervals over clips, checked against hand computations."""

from __future__ import annotations

import math

import pytest

from omni_train.evaluation.measurement import MetricValue
from omni_train.evaluation.summary import mean_interval, summarize, t_quantile

# Two-sided 95 % critical values of Student's t from printed tables.
T_TABLE = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-8)


def test_interval_is_the_t_interval_of_the_values():
    values = [1.0, 2.0, 4.0, 5.0]  # mean 3, sample variance 10/3
    mean, interval, why = mean_interval(values)
    half = 3.182446305284 * math.sqrt(10 / 3) / 2
    assert mean == 3.0 and why is None
    assert interval == pytest.approx([3.0 - half, 3.0 + half], abs=1e-9)
    assert mean_interval([7.5]) == (7.5, None, "one clip: no interval")


def value(v, reason=None):
    return MetricValue(v, "m", reason, higher_is_better=False)


def test_summary_counts_only_measured_values_and_keeps_the_reasons():
    rows = [
        {"generated": {"psnr": value(10.0), "id": value(None, "no face")}},
        {"generated": {"psnr": value(14.0), "id": value(0.5)}},
        {"generated": {"psnr": value(None, "raised"), "id": value(None, "no face")}},
    ]
    summary = summarize(rows, ["generated"])["generated"]
    half = 12.706204736 * math.sqrt(8.0) / math.sqrt(2)
    assert summary["psnr"]["mean"] == 12.0
    assert summary["psnr"]["ci95"] == pytest.approx([12.0 - half, 12.0 + half], abs=1e-7)
    assert (summary["psnr"]["n"], summary["psnr"]["not_measured"]) == (2, 1)
    assert summary["psnr"]["reasons"] == ["raised"]
    assert summary["psnr"]["higher_is_better"] is False
    assert summary["id"]["mean"] == 0.5 and summary["id"]["ci95"] is None
    assert summary["id"]["ci95_reason"] == "one clip: no interval"


def test_a_metric_never_measured_has_no_mean_and_says_why():
    rows = [{"real": {"psnr": value(None, "infinite")}}, {"real": {"psnr": value(None, "inf2")}}]
    entry = summarize(rows, ["real"])["real"]["psnr"]
    assert entry["mean"] is None and entry["n"] == 0 and entry["reason"] == "inf2; infinite"
