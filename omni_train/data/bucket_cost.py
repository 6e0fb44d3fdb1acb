"""Batch size per (resolution x length) bucket from a cost budget, so steps take a similar time.

A bucket's cost per sample is the denoiser's training FLOPs for one clip of that bucket
(``omni_train.models.training_cost.train_flops_per_sample_of``: for this project's MMDiT the
closed form of ``flops.train_flops_per_sample``, which counts the linear layers, tokens x
width^2, and the joint attention, tokens^2 x width, exactly; a foundation backbone is counted
on the meta device). With ``data.batch_by_cost=true`` each bucket's batch size becomes

    batch_size = floor(budget / cost_per_sample(bucket))

so a batch of any bucket costs at most the budget and at least budget - cost_per_sample. The
budget is ``data.cost_budget`` FLOPs per rank batch, or "auto": the cost of the costliest
bucket at its configured batch size (that bucket keeps its batch size, the others get as many
samples as fit in the same cost). The computed size replaces the configured one;
``data.cost_max_batch_size`` caps it (activation memory grows with the samples of a batch). A
bucket whose single sample costs more than the budget is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from omni_train.data.config import BucketConfig, DataConfig, parse_cost_budget

if TYPE_CHECKING:
    from omni_train.models.config import ModelConfig

# (model config, resolution, num_frames) -> training FLOPs of one sample.
SampleCost = Callable[["ModelConfig", Sequence[int], int], int]


def _train_flops(model_cfg: ModelConfig, resolution: Sequence[int], num_frames: int) -> int:
    from omni_train.models.training_cost import train_flops_per_sample_of

    return train_flops_per_sample_of(model_cfg, resolution, num_frames)


def bucket_labels(buckets: Sequence[BucketConfig], plain: bool = False) -> list[str]:
    """How errors name each bucket: data.buckets.N, or a plain config's data.resolution."""
    labels = []
    for i, bucket in enumerate(buckets):
        height, width = bucket.resolution
        name = "data.resolution / data.num_frames" if plain else f"data.buckets.{i}"
        labels.append(f"{name} ({height}x{width}, {bucket.num_frames} frames)")
    return labels


def bucket_costs(
    model_cfg: ModelConfig,
    buckets: Sequence[BucketConfig],
    sample_cost: SampleCost = _train_flops,
    labels: Sequence[str] | None = None,
) -> list[int]:
    """Training FLOPs of one sample of each bucket."""
    labels = labels or bucket_labels(buckets)
    costs = []
    for bucket, label in zip(buckets, labels, strict=True):
        try:
            costs.append(int(sample_cost(model_cfg, list(bucket.resolution), bucket.num_frames)))
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from err
    return costs


def resolve_budget(
    budget: str, buckets: Sequence[BucketConfig], costs: Sequence[int]
) -> float | int:
    """The budget in FLOPs: the number given, or the costliest bucket at its batch size (an
    exact integer, so that bucket keeps exactly its batch size)."""
    value = parse_cost_budget(budget)
    if value is not None:
        return value
    costliest = max(range(len(buckets)), key=lambda i: (costs[i], -i))
    return costs[costliest] * buckets[costliest].batch_size


def cost_batch_sizes(
    buckets: Sequence[BucketConfig],
    costs: Sequence[int],
    budget: float | int,
    max_batch_size: int = 0,
    labels: Sequence[str] | None = None,
) -> list[int]:
    """floor(budget / cost) per bucket, capped at ``max_batch_size`` when it is positive."""
    labels = labels or bucket_labels(buckets)
    sizes = []
    for label, cost in zip(labels, costs, strict=True):
        if cost <= 0:
            raise ValueError(f"{label} costs {cost} FLOPs per sample")
        size = int(budget // cost)
        if size < 1:
            raise ValueError(
                f"{label} costs {cost:.4g} training FLOPs per sample, "
                f"more than data.cost_budget={budget:.4g} allows for one sample: raise "
                "data.cost_budget, or drop or shrink that bucket"
            )
        sizes.append(min(size, max_batch_size) if max_batch_size > 0 else size)
    return sizes


def with_cost_batch_sizes(
    cfg: DataConfig,
    model_cfg: ModelConfig | None,
    sample_cost: SampleCost = _train_flops,
) -> DataConfig:
    """``cfg`` with each bucket's batch size from the cost budget (``cfg`` itself when
    data.batch_by_cost is off). A config without data.buckets has its one bucket's
    data.batch_size replaced, so it stays a plain config."""
    if not cfg.batch_by_cost:
        return cfg
    if model_cfg is None:
        raise ValueError(
            "data.batch_by_cost=true counts each bucket's cost from the model config: pass it, "
            "build_loader(cfg.data, ..., model_cfg=cfg.model), or set data.batch_by_cost=false"
        )
    buckets = cfg.bucket_list()
    labels = bucket_labels(buckets, plain=not cfg.buckets)
    costs = bucket_costs(model_cfg, buckets, sample_cost, labels)
    budget = resolve_budget(cfg.cost_budget, buckets, costs)
    sizes = cost_batch_sizes(buckets, costs, budget, cfg.cost_max_batch_size, labels)
    if not cfg.buckets:
        return replace(cfg, batch_size=sizes[0], batch_by_cost=False)
    sized = [replace(b, batch_size=n) for b, n in zip(cfg.buckets, sizes, strict=True)]
    return replace(cfg, buckets=sized, batch_by_cost=False)


def step_time_spread(seconds: Sequence[float]) -> float:
    """max / min of per-bucket step times: 1.0 when every bucket's step takes as long."""
    if not seconds or min(seconds) <= 0:
        raise ValueError(f"step times {list(seconds)} must be positive")
    return max(seconds) / min(seconds)
