"""The validation loss's cost against training, on one CPU rank at the default settings
(tiny model, 64x64, 17 frames, batch 2, ZeRO-2; trainer.val_loss: 16 clips x 8 timesteps).

One run trains a few steps (median step time: the floor), then evaluates the validation
loss a few times (median), and prints validation as a share of training time at the
recommended cadence trainer.val_every=1000: val_s / (1000 x step_s).
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

STEPS = 16
EVALUATIONS = 3
VAL_EVERY = 1000


def _measure(overrides: list[str]) -> dict:
    import torch.distributed as dist

    from omni_train.testing import train_timed

    trainer, times = train_timed(overrides)
    val_times, metrics = [], {}
    for _ in range(EVALUATIONS):
        started = time.perf_counter()
        metrics = trainer.val_loss.run(trainer.engine)
        val_times.append(time.perf_counter() - started)
    dist.destroy_process_group()
    return {
        "step_s": statistics.median(times[2:]),
        "val_s": statistics.median(val_times),
        "clips": metrics["val/num_clips"],
        "forwards": sum(v for k, v in metrics.items() if k.count("/") == 1 and "count_" in k),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = build_sample_shards(Path(tmp) / "corpus", num_clips=14, seed=1)
        shards = f"{data}/shards/*.tar"
        overrides = [
            f"run_dir={tmp}/run",
            f"data.shards={shards}",
            f"data.val_shards={shards}",
            f"trainer.max_steps={STEPS}",
            f"trainer.save_every={STEPS * 10}",
            "trainer.zero_stage=2",
            "trainer.progress_bar=false",
            # Builds the trainer's validation (run once before training: a warm-up); the
            # evaluations measured are the ones after the training steps.
            "trainer.val_at_start=true",
            "logger.wandb.enabled=false",
        ]
        (result,) = run_ranks(_measure, 1, overrides, timeout=900)
    step_s, val_s = result["step_s"], result["val_s"]
    share = val_s / (VAL_EVERY * step_s)
    print(
        f"validation loss: {result['clips']} clips, {result['forwards']} (clip, task) forwards "
        f"of 8 timesteps each"
    )
    print(f"  train step (floor)              {step_s * 1000:8.1f} ms")
    print(f"  one validation                  {val_s * 1000:8.1f} ms = {val_s / step_s:.1f} steps")
    print(
        f"  validation as a share of training time at trainer.val_every={VAL_EVERY}: "
        f"{100 * share:.2f} % (target < 5 %)"
    )


if __name__ == "__main__":
    main()
