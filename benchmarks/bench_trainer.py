"""Trainer overheads on one CPU rank (tiny smoke model, fp32, ZeRO-2).

A step is timed from the start of its forward to the end of the post-update hook (where
the EMA update runs), leaving out the time spent waiting for its batch: forward, backward,
optimizer step and, with EMA on, the EMA update.

Figures: the median step with EMA off (the floor); the median step with EMA on, its update
included, and its ratio to the step just before it in the same run, which skipped the
update (the EMA run updates every 2nd step, trainer.ema.update_every=2, so steps with and
without the update alternate in one process and a load change on this shared machine hits
both alike; an update costs the same whatever update_every; the median over the pairs is
printed); the EMA update alone; the per-step agreement all-reduce; checkpoint save time;
universal-checkpoint conversion time (what a resume on another world size pays once). Other
ratios are to the floor. Every step runs in the smoke curriculum's first stage.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from data_pipelines.testing import build_sample_shards  # noqa: E402
from omni_train.testing import run_ranks  # noqa: E402

STEPS = 12
WARMUP_STEPS = 2
EMA_PAIRS = 20
EMA_STEPS = WARMUP_STEPS + 2 * EMA_PAIRS
# The smoke curriculum adds audio after 20 steps and pose after 40: keep every step in its
# first stage so that all steps do the same work.
FIRST_STAGE_ONLY = ["curriculum.stages.1.start_step=1000", "curriculum.stages.2.start_step=2000"]


def _train_timing_steps(overrides: list[str]) -> tuple[object, list[float], list[float]]:
    """Train, timing each step from the start of forward to the end of the EMA update.

    Returns the Trainer (process group still up), the step seconds minus the step's wait for
    batches, and the seconds of the post-update hook (the EMA update when EMA is on).
    """
    from omni_train.config import compose_train_config
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    steps: list[float] = []
    updates: list[float] = []
    train_step, after_update = trainer._train_step, trainer._after_update
    started, data_wait = 0.0, 0.0

    def timed_step(batches, flag):
        nonlocal started, data_wait
        started = time.perf_counter()
        out = train_step(batches, flag)
        data_wait = out[1]
        return out

    def timed_after_update(finite: bool) -> None:
        update_started = time.perf_counter()
        after_update(finite)
        done = time.perf_counter()
        updates.append(done - update_started)
        steps.append(done - started - data_wait)

    trainer._train_step = timed_step
    trainer._after_update = timed_after_update
    trainer.run()
    return trainer, steps, updates


def _measure(overrides: list[str], costs: bool) -> dict:
    import torch.distributed as dist

    from omni_train.trainer.universal import convert_to_universal

    trainer, steps, updates = _train_timing_steps(overrides)
    result = {"steps": steps[WARMUP_STEPS:], "updates": updates[WARMUP_STEPS:]}
    if costs:
        started = time.perf_counter()
        saved = trainer.save()
        result["save_s"] = time.perf_counter() - started
        agree = []
        for _ in range(50):
            started = time.perf_counter()
            trainer._agree(False, False)
            agree.append(time.perf_counter() - started)
        result["agree_s"] = statistics.median(agree)
        started = time.perf_counter()
        convert_to_universal(saved, trainer.run_dir)
        result["convert_s"] = time.perf_counter() - started
    dist.destroy_process_group()
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = build_sample_shards(Path(tmp) / "corpus", num_clips=3, seed=0)
        results = {}
        for name, extra in (
            ("plain", [f"trainer.max_steps={STEPS}"]),
            (
                "ema",
                [
                    f"trainer.max_steps={EMA_STEPS}",
                    "trainer.ema.enabled=true",
                    "trainer.ema.update_every=2",
                ],
            ),
        ):
            overrides = [
                "experiment=smoke",
                *FIRST_STAGE_ONLY,
                f"run_dir={tmp}/run_{name}",
                f"data.shards={data}/shards/*.tar",
                f"trainer.save_every={EMA_STEPS * 10}",
                "trainer.zero_stage=2",
                "trainer.progress_bar=false",
                "logger.wandb.enabled=false",
                *extra,
            ]
            results[name] = run_ranks(_measure, 1, overrides, name == "plain")[0]
    plain, ema = results["plain"], results["ema"]
    floor = statistics.median(plain["steps"])
    # The timed steps start at step WARMUP_STEPS + 1 (odd: no update); each even step updates.
    without, with_update = ema["steps"][0::2], ema["steps"][1::2]
    paired = statistics.median(b / a for a, b in zip(without, with_update, strict=True))
    update = statistics.median(ema["updates"][1::2])
    print("a step: forward + backward + optimizer step (+ EMA update), its batch wait left out")
    print(f"step, EMA off (floor)             {floor * 1e3:8.1f} ms")
    print(
        f"step with EMA, update included    {statistics.median(with_update) * 1e3:8.1f} ms  "
        f"x{paired:.3f} of the step before it, without the update (median of {EMA_PAIRS} pairs)"
    )
    print(
        f"EMA update alone                  {update * 1e3:8.2f} ms  x{update / floor:.4f} of a step"
    )
    agree = plain["agree_s"]
    print(
        f"agreement all-reduce              {agree * 1e3:8.3f} ms  x{agree / floor:.4f} of a step"
    )
    save = plain["save_s"]
    print(f"checkpoint save                   {save * 1e3:8.1f} ms  x{save / floor:.1f} steps")
    conv = plain["convert_s"]
    print(
        f"universal conversion              {conv:8.2f} s   x{conv / floor:.1f} steps (once per resize)"
    )


if __name__ == "__main__":
    main()
