"""Means with 95 % intervals over clips, per candidate and metric.

The interval is Student's t over clips: mean +- t(0.975, n - 1) * s / sqrt(n), with s the
sample standard deviation (ddof 1). It assumes clips are independent draws; with n = 1 there
is no interval (null, with the reason). Only measured values count: clips where a metric could
not be measured are counted apart, with their reasons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from omni_train.evaluation.measurement import MetricValue

INTERVAL_METHOD = (
    "95 % Student-t interval over clips: mean +- t(0.975, n-1) * s / sqrt(n), s the sample "
    "standard deviation (ddof 1); none for n = 1"
)


def t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on [0, x] (the density is smooth and bounded)."""
    intervals += intervals % 2  # Simpson's rule needs an even count
    h = x / intervals
    total = t_density(0.0, df) + t_density(x, df)
    total += sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom (Newton steps)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    # Start from the normal quantile's Cornish-Fisher expansion, above the root: Newton then
    # descends monotonically on the concave upper tail of the CDF.
    x = 1.96 + (1.96**3 + 1.96) / (4 * df) + 10.0 / df**2
    for _ in range(100):
        step = (t_cdf(x, df, intervals=max(2000, int(200 * x))) - p) / t_density(x, df)
        x -= step
        if abs(step) < 1e-12 * max(1.0, x):
            break
    return x


def mean_interval(values: list[float]) -> tuple[float, list[float] | None, str | None]:
    """(mean, [lo, hi] or None, why there is no interval)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None, "one clip: no interval"
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half], None


def summarize_metric(values: Iterable[MetricValue]) -> dict:
    """One metric over clips: mean, ci95, n measured, and the reasons of the unmeasured."""
    values = list(values)
    measured = [v for v in values if v.value is not None]
    first = (measured or values)[0]
    entry: dict = {
        "mean": None,
        "ci95": None,
        "n": len(measured),
        "not_measured": len(values) - len(measured),
        "method": first.method,
        "higher_is_better": first.higher_is_better,
    }
    if measured:
        mean, interval, why = mean_interval([float(v.value) for v in measured])
        entry.update(mean=mean, ci95=interval)
        if why:
            entry["ci95_reason"] = why
    reasons = sorted({v.reason for v in values if v.value is None and v.reason})
    if reasons:
        entry["reasons"] = reasons
    if not measured:
        entry["reason"] = "; ".join(reasons) or "not measured"
    return entry


def summarize(
    rows: list[Mapping[str, Mapping[str, MetricValue]]], candidates: Iterable[str]
) -> dict[str, dict[str, dict]]:
    """{candidate: {metric key: summary}} from per-clip {candidate: {key: MetricValue}} rows."""
    summary: dict[str, dict[str, dict]] = {}
    for candidate in candidates:
        keys = list(dict.fromkeys(k for row in rows for k in row.get(candidate, {})))
        summary[candidate] = {
            key: summarize_metric(row[candidate][key] for row in rows if key in row[candidate])
            for key in keys
        }
    return summary
