"""What the curriculum did, as flat metrics: per-task counts, realised ratios and tier mix.

``step_counts`` turns one micro-batch's masks into additive counts (sum them over
micro-batches and ranks); ``ratio_metrics`` derives the ratios from summed counts;
``StageTotals`` keeps the running per-stage sums so that metrics.jsonl shows, at every logged
step, the realised ratio of each condition over the whole stage so far beside its target.

Names (all flat, ``c`` a condition, ``t`` a tier, ``k`` the 1-based stage):
  active_c        samples with c on              eligible_c   samples whose tier may train c
  expected_c      sum of their configured probabilities (the target count)
  tier_c_t        samples of tier t for c        count_task_T  samples whose strongest
                                                               active condition is T
  ratio_c         active_c / eligible_c          target_ratio_c  expected_c / eligible_c
  stage{k}/...    the same over every step of stage k so far
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from omni_train.contracts import CONDITIONS, TIERS
from omni_train.curriculum.config import CurriculumConfig
from omni_train.curriculum.schedule import effective_ratio, stage_at, tier_weight

# A sample's task is named after its strongest active condition (paper §3.3 order).
TASKS: tuple[str, ...] = ("uncond", *CONDITIONS)


def task_names(masks: Mapping[str, np.ndarray]) -> list[str]:
    """The task of each sample: its strongest active condition, "uncond" when none is."""
    size = len(next(iter(masks.values())))
    tasks = ["uncond"] * size
    for cond in CONDITIONS:
        for i in np.flatnonzero(np.asarray(masks[cond])):
            tasks[i] = cond
    return tasks


def count_names() -> list[str]:
    """The keys of ``step_counts`` in a fixed order (for packing into one all-reduce)."""
    names = ["samples"]
    for cond in CONDITIONS:
        names += [f"active_{cond}", f"eligible_{cond}", f"expected_{cond}"]
        names += [f"tier_{cond}_{tier}" for tier in TIERS]
    names += [f"count_task_{task}" for task in TASKS]
    return names


def step_counts(
    cfg: CurriculumConfig,
    step: int,
    masks: Mapping[str, np.ndarray],
    qualities: Sequence[Mapping[str, str]],
    has_audio: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Additive counts of one micro-batch's condition assignment at ``step``.

    ``has_audio``: a clip without a track cannot train audio whatever its tag, so when given
    such clips count as neither eligible nor active for audio.
    """
    _, stage = stage_at(cfg, step)
    counts = dict.fromkeys(count_names(), 0.0)
    counts["samples"] = float(len(qualities))
    masks = {c: np.asarray(masks[c], dtype=bool) for c in CONDITIONS}
    if has_audio is not None:
        masks["audio"] = masks["audio"] & np.asarray(has_audio, dtype=bool)
    for i, quality in enumerate(qualities):
        for cond in CONDITIONS:
            tier = quality.get(cond, "none")
            tier = tier if tier in TIERS else "none"
            counts[f"tier_{cond}_{tier}"] += 1
            usable = has_audio is None or cond != "audio" or bool(has_audio[i])
            if usable and tier_weight(cfg, stage, cond, tier) > 0:
                counts[f"eligible_{cond}"] += 1
                counts[f"expected_{cond}"] += effective_ratio(cfg, step, cond, tier)
            counts[f"active_{cond}"] += float(masks[cond][i])
    for task in task_names(masks):
        counts[f"count_task_{task}"] += 1
    return counts


def add_counts(total: Mapping[str, float], more: Mapping[str, float]) -> dict[str, float]:
    return {name: total.get(name, 0.0) + more.get(name, 0.0) for name in count_names()}


def ratio_metrics(counts: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Realised and target ratio per condition and tier shares, from summed counts."""
    out: dict[str, float] = {}
    samples = max(counts.get("samples", 0.0), 1.0)
    for cond in CONDITIONS:
        eligible = counts.get(f"eligible_{cond}", 0.0)
        if eligible:
            out[f"{prefix}ratio_{cond}"] = counts[f"active_{cond}"] / eligible
            out[f"{prefix}target_ratio_{cond}"] = counts[f"expected_{cond}"] / eligible
        for tier in TIERS:
            out[f"{prefix}tier_share_{cond}_{tier}"] = counts[f"tier_{cond}_{tier}"] / samples
    return out


def step_metrics(
    cfg: CurriculumConfig,
    step: int,
    masks: Mapping[str, np.ndarray],
    qualities: Sequence[Mapping[str, str]],
    has_audio: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Counts and ratios of one batch (one rank); see the module doc for the names."""
    counts = step_counts(cfg, step, masks, qualities, has_audio)
    return {**counts, **ratio_metrics(counts)}


class StageTotals:
    """Running per-stage sums of ``step_counts``; ``update`` adds the stage-so-far ratios.

    Feed it counts already summed over ranks so every rank (and the log) agrees; its state
    is a plain dict for the checkpoint.
    """

    def __init__(self, cfg: CurriculumConfig, state: Mapping | None = None) -> None:
        self.cfg = cfg
        self.totals: dict[int, dict[str, float]] = {}
        self.load_state_dict(state or {})

    def update(self, step: int, counts: Mapping[str, float]) -> dict[str, float]:
        """Add counts of ``step``'s stage; returns their ratios plus the stage's running ones.

        Raw counts (active_c, count_task_T) are left to the caller's own per-step keys.
        """
        stage = stage_at(self.cfg, step)[0] + 1
        self.totals[stage] = add_counts(self.totals.get(stage, {}), counts)
        running = self.totals[stage]
        out = ratio_metrics(counts)
        out.update(ratio_metrics(running, prefix=f"stage{stage}/"))
        out.update({f"stage{stage}/{n}": running[n] for n in ("samples", *_task_keys())})
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {str(k): dict(v) for k, v in self.totals.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self.totals = {int(k): dict(v) for k, v in state.items()}


class CurriculumMeter:
    """Collects the curriculum's counts between two logged steps, for every rank.

    In the training loop (all ranks)::

        meter.add(step, masks, batch.quality, batch.has_audio)            # per micro-batch
        summed = torch.tensor(meter.vector(), dtype=torch.float64)       # at a log step
        dist.all_reduce(summed)
        row.update(meter.flush(step, summed.tolist()))
    """

    def __init__(self, cfg: CurriculumConfig, state: Mapping | None = None) -> None:
        self.cfg = cfg
        self.names = count_names()
        self.totals = StageTotals(cfg, state)
        self._pending = np.zeros((len(cfg.stages), len(self.names)))

    def add(self, step: int, masks, qualities, has_audio=None) -> None:
        if has_audio is not None and hasattr(has_audio, "cpu"):
            has_audio = has_audio.cpu().numpy()
        counts = step_counts(self.cfg, step, masks, qualities, has_audio)
        self._pending[stage_at(self.cfg, step)[0]] += [counts[n] for n in self.names]

    def vector(self) -> list[float]:
        """This rank's counts since the last flush, flat (sum it over ranks)."""
        return self._pending.reshape(-1).tolist()

    def flush(self, step: int, summed: Sequence[float] | None = None) -> dict[str, float]:
        """Metrics of the counts since the last flush (``summed`` over ranks, else this
        rank's) and of ``step``'s stage so far; then starts a new interval."""
        table = np.asarray(self.vector() if summed is None else summed).reshape(self._pending.shape)
        self._pending[:] = 0
        out: dict[str, float] = {}
        current = stage_at(self.cfg, step)[0]
        for index, row in enumerate(table):
            if row.any() or index == current:
                interval = dict(zip(self.names, row.tolist(), strict=True))
                metrics = self.totals.update(self.cfg.stages[index].start_step, interval)
                if index == current:
                    out.update(metrics)
                else:  # a stage that ended inside the interval: keep only its totals
                    out.update({k: v for k, v in metrics.items() if k.startswith("stage")})
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The stage-so-far totals (counts since the last flush are not kept)."""
        return self.totals.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.totals.load_state_dict(state)
        self._pending[:] = 0


def _task_keys() -> list[str]:
    return [f"count_task_{task}" for task in TASKS]
