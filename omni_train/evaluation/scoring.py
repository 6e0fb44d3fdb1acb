"""Running metrics on candidates without letting one metric take the evaluation down.

A metric that cannot be imported or built, or that raises on a clip, is recorded as not
measured (``None``) with the error as the reason, under every key the metric gives elsewhere
(or under its name when it never gave any). A non-finite value is not measured either: JSON
cannot hold it and a mean over it means nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import (
    CLIP_METRICS,
    SET_METRICS,
    MetricsConfig,
    build_clip_metrics,
    build_set_metrics,
)

# What one metric call gave: its values, or the reason it failed (a string).
Outcome = dict[str, MetricValue] | str


@dataclass
class LoadedMetric:
    name: str
    metric: Any | None
    # Why the metric could not be built (import error, bad weights, ...); None when built.
    error: str | None = None

    @property
    def whole_generation(self) -> bool:
        """Scores the whole generation (long-video drift) rather than its overlap with the
        real clip; a metric says so with a ``whole_generation`` attribute."""
        return bool(getattr(self.metric, "whole_generation", self.name == "drift"))


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def load_metrics(cfg: MetricsConfig, kind: str) -> list[LoadedMetric]:
    """The enabled clip (``kind="clip"``) or set (``kind="set"``) metrics, each built alone."""
    table, build = (
        (CLIP_METRICS, build_clip_metrics)
        if kind == "clip"
        else (
            SET_METRICS,
            build_set_metrics,
        )
    )
    loaded = []
    for name in table:
        if cfg.enabled and name not in cfg.enabled:
            continue
        try:
            (metric,) = build(replace(cfg, enabled=[name]))
            loaded.append(LoadedMetric(name, metric))
        except Exception as err:  # noqa: BLE001 - any failure becomes a labelled None
            loaded.append(LoadedMetric(name, None, f"could not be loaded: {_describe(err)}"))
    return loaded


def checked(result: Any) -> dict[str, MetricValue]:
    """A metric's result, with non-finite values turned into labelled Nones."""
    if not isinstance(result, dict) or not all(isinstance(v, MetricValue) for v in result.values()):
        raise TypeError(f"a metric must return {{key: MetricValue}}, got {type(result).__name__}")
    out = {}
    for key, value in result.items():
        if value.series is not None:
            series = [
                float(x) if x is not None and math.isfinite(x) else None for x in value.series
            ]
            value = replace(value, series=series)
        if value.value is not None and not math.isfinite(float(value.value)):
            value = replace(value, value=None, reason=f"not finite ({value.value})")
        elif value.value is not None:
            value = replace(value, value=float(value.value))
        out[key] = value
    return out


def call_metric(loaded: LoadedMetric, *args: Any) -> Outcome:
    if loaded.metric is None:
        return loaded.error or "not built"
    try:
        return checked(loaded.metric(*args))
    except Exception as err:  # noqa: BLE001 - one failing metric must not end the evaluation
        return f"raised {_describe(err)}"


def clip_for(clip: ClipInputs, frames: int) -> ClipInputs:
    """The clip's inputs for a candidate of ``frames`` frames: segments clipped to it."""
    segments = [(lo, min(hi, frames)) for lo, hi in clip.segments if lo < frames]
    return replace(clip, segments=segments)


def score_clip(
    metrics: list[LoadedMetric], candidates: dict[str, np.ndarray], clip: ClipInputs
) -> tuple[dict[str, dict[str, Outcome]], dict[str, float]]:
    """{candidate: {metric name: outcome}} and the seconds each metric took over all
    candidates. Candidates are cut to the real clip's length unless the metric scores the
    whole generation."""
    overlap = len(clip.real)
    outcomes: dict[str, dict[str, Outcome]] = {name: {} for name in candidates}
    seconds: dict[str, float] = {}
    for loaded in metrics:
        start = time.perf_counter()
        for name, video in candidates.items():
            if not loaded.whole_generation:
                video = video[:overlap]
            outcomes[name][loaded.name] = call_metric(loaded, video, clip_for(clip, len(video)))
        seconds[loaded.name] = time.perf_counter() - start
    return outcomes, seconds


def resolve(rows: list[dict[str, dict[str, Outcome]]]) -> list[dict[str, dict[str, MetricValue]]]:
    """Per row {candidate: {metric name: outcome}} -> {candidate: {key: MetricValue}}, a failed
    call filled in under the keys its metric gives elsewhere."""
    keys: dict[str, dict[str, MetricValue]] = {}
    for row in rows:
        for outcomes in row.values():
            for name, outcome in outcomes.items():
                if isinstance(outcome, dict):
                    for key, value in outcome.items():
                        keys.setdefault(name, {}).setdefault(key, value)
    resolved = []
    for row in rows:
        out_row: dict[str, dict[str, MetricValue]] = {}
        for candidate, outcomes in row.items():
            values: dict[str, MetricValue] = {}
            for name, outcome in outcomes.items():
                if isinstance(outcome, dict):
                    values.update(outcome)
                    continue
                known = keys.get(name) or {name: MetricValue.missing(name, "")}
                for key, example in known.items():
                    values[key] = MetricValue.missing(
                        example.method, f"{name}: {outcome}", example.higher_is_better
                    )
            out_row[candidate] = values
        resolved.append(out_row)
    return resolved
