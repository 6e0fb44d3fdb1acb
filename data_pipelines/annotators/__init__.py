"""Swappable annotators: each a Hydra ``_target_`` node under ``annotators`` in the shard
config, run in order on every clip (see base.py for the interface)."""

from __future__ import annotations

import json
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from data_pipelines.annotators.base import (
    AnnotatorUnavailable,
    ClipView,
    Findings,
    optional_import,
)

__all__ = ["AnnotatorUnavailable", "ClipView", "Findings", "build_annotators", "optional_import"]

_cache: dict[str, list] = {}


def build_annotators(nodes: dict[str, Any]) -> list:
    """Instantiate the enabled annotators (a null node disables one), once per process."""
    spec = json.dumps(nodes, sort_keys=True, default=str)
    if spec not in _cache:
        annotators = []
        for name, node in nodes.items():
            if node is None:
                continue
            if not isinstance(node, dict) or "_target_" not in node:
                raise ValueError(
                    f"annotators.{name} must be a mapping with _target_ (a class path such as "
                    "data_pipelines.annotators.image.Motion), or null to disable it"
                )
            try:
                annotators.append(instantiate(node, _convert_="all"))
            except InstantiationException as err:
                if isinstance(err.__cause__, (ValueError, AnnotatorUnavailable)):
                    raise err.__cause__ from None
                raise ValueError(f"annotators.{name}: {err}") from err
        _cache[spec] = annotators
    return _cache[spec]


def describe(nodes: dict[str, Any]) -> dict[str, str]:
    """name -> the backend each annotator resolved to here ("auto" depends on installed
    packages), so a resumed job can tell when its outputs would differ."""
    out = {}
    for name, annotator in zip(
        [n for n, node in nodes.items() if node is not None], build_annotators(nodes), strict=True
    ):
        out[name] = getattr(annotator, "resolved", type(annotator).__name__)
    return out
