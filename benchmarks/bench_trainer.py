"""Trainer overheads on one CPU rank (tiny smoke model, fp32, ZeRO-2).

Figures: median step time with the plain loop (the floor), with EMA, the per-step
agreement all-reduce; checkpoint save time; universal-checkpoint conversion time (what a
resume on another world size pays once). Ratios are to the floor of the same run.
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


def _measure(overrides: list[str]) -> dict:
    import torch.distributed as dist

    from omni_train.testing import train_timed
    from omni_train.trainer.universal import convert_to_universal

    trainer, times = train_timed(overrides)
    started = time.perf_counter()
    saved = trainer.save()
    save_s = time.perf_counter() - started
    agree = []
    for _ in range(50):
        started = time.perf_counter()
        trainer._agree(False, False)
        agree.append(time.perf_counter() - started)
    started = time.perf_counter()
    convert_to_universal(saved, trainer.run_dir)
    convert_s = time.perf_counter() - started
    dist.destroy_process_group()
    return {
        "step_s": statistics.median(times[2:]),
        "save_s": save_s,
        "agree_s": statistics.median(agree),
        "convert_s": convert_s,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = build_sample_shards(Path(tmp) / "corpus", num_clips=3, seed=0)
        results = {}
        for name, extra in (("plain", []), ("ema", ["trainer.ema.enabled=true"])):
            overrides = [
                "experiment=smoke",
                f"run_dir={tmp}/run_{name}",
                f"data.shards={data}/shards/*.tar",
                f"trainer.max_steps={STEPS}",
                f"trainer.save_every={STEPS * 10}",
                "trainer.zero_stage=2",
                "trainer.progress_bar=false",
                "logger.wandb.enabled=false",
                *extra,
            ]
            results[name] = run_ranks(_measure, 1, overrides)[0]
    floor = results["plain"]["step_s"]
    print(f"step (floor)            {floor * 1e3:8.1f} ms")
    print(
        f"step with EMA           {results['ema']['step_s'] * 1e3:8.1f} ms  x{results['ema']['step_s'] / floor:.2f}"
    )
    agree = results["plain"]["agree_s"]
    print(f"agreement all-reduce    {agree * 1e3:8.3f} ms  x{agree / floor:.4f} of a step")
    save = results["plain"]["save_s"]
    print(f"checkpoint save         {save * 1e3:8.1f} ms  x{save / floor:.1f} steps")
    conv = results["plain"]["convert_s"]
    print(f"universal conversion    {conv:8.2f} s   x{conv / floor:.1f} steps (once per resize)")


if __name__ == "__main__":
    main()
