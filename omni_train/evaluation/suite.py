"""Which metrics an evaluation runs, built from one config.

Each entry of ``CLIP_METRICS`` / ``SET_METRICS`` names a class ``module:Class`` whose
constructor takes the :class:`MetricsConfig`; a metric whose weights are not configured still
runs and reports ``None`` with the reason, so every report lists every metric.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from omni_train.evaluation.measurement import ClipMetric, SetMetric


@dataclass
class MetricsConfig:
    # Metric names to run (keys of CLIP_METRICS and SET_METRICS); empty = all of them.
    enabled: list[str] | None = None
    # Identity embedder: "dlib" (face-recognition-models weights, offline) or "arcface_onnx"
    # with identity_weights=PATH to an ArcFace ONNX model.
    identity: str = "dlib"
    identity_weights: str = ""
    # SyncNet weights (the public model's state dict) for Sync-C / Sync-D; without them the
    # labelled lip-sync proxy is reported instead, never under the Sync-C name.
    syncnet_weights: str = ""
    # TorchScript feature extractors for FID (Inception-v3 pool3, 2048-d) and FVD (I3D,
    # 400-d logits as in the public FVD code); "" = "not measured".
    inception_weights: str = ""
    i3d_weights: str = ""
    # Frames per candidate video that identity embeds (evenly spaced; 0 = every frame).
    identity_frames: int = 16
    # Every n-th frame goes through MediaPipe Hands for HKC / HKV (1 = all).
    hands_stride: int = 1
    # SyncNet offset search +-frames (the reference's --vshift) and batch size.
    sync_max_offset: int = 15
    sync_batch: int = 20
    # Long-video drift: frames embedded per generated segment, and histogram bins per channel.
    drift_frames_per_segment: int = 4
    drift_color_bins: int = 32
    # Segment length (seconds) when a clip gives no segments (e.g. a real clip).
    drift_segment_seconds: float = 2.0
    # FID: frames per video fed to Inception (evenly spaced; 0 = all). FVD: frames per clip.
    fid_frames_per_video: int = 16
    fvd_frames: int = 16


CLIP_METRICS: dict[str, str] = {
    "fidelity": "omni_train.evaluation.fidelity:FidelityMetric",
    "identity": "omni_train.evaluation.identity:IdentityMetric",
    "hands": "omni_train.evaluation.hands:HandKeypointMetric",
    "sync": "omni_train.evaluation.sync:SyncMetric",
    "drift": "omni_train.evaluation.drift:DriftMetric",
}
SET_METRICS: dict[str, str] = {
    "fid": "omni_train.evaluation.frechet:FIDMetric",
    "fvd": "omni_train.evaluation.frechet:FVDMetric",
}


def _load(path: str, cfg: MetricsConfig):
    module, _, cls = path.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    try:
        return factory(cfg)
    except TypeError:
        return factory()


def _selected(table: dict[str, str], cfg: MetricsConfig) -> list[str]:
    known = set(CLIP_METRICS) | set(SET_METRICS)
    unknown = sorted(set(cfg.enabled or []) - known)
    if unknown:
        raise ValueError(f"metrics.enabled: unknown metric(s) {unknown}; known: {sorted(known)}")
    return [name for name in table if not cfg.enabled or name in cfg.enabled]


def build_clip_metrics(cfg: MetricsConfig) -> list[ClipMetric]:
    return [_load(CLIP_METRICS[name], cfg) for name in _selected(CLIP_METRICS, cfg)]


def build_set_metrics(cfg: MetricsConfig) -> list[SetMetric]:
    return [_load(SET_METRICS[name], cfg) for name in _selected(SET_METRICS, cfg)]
