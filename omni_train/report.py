"""Summarise a finished run: where its outputs are and what each curriculum stage did.

python -m omni_train.report run_dir=DIR [data_dir=DIR] [sample=MP4] [seconds=N]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from omni_train.curriculum import CONDITIONS
from omni_train.trainer.checkpoint import complete_checkpoints


def read_metrics(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def stage_summary(rows: list[dict]) -> list[dict]:
    """Per stage: steps, first/last loss (mean of up to 5 rows) and activation totals."""
    by_stage: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_stage[row["stage"]].append(row)
    summary = []
    for stage, stage_rows in sorted(by_stage.items()):
        head, tail = stage_rows[:5], stage_rows[-5:]
        summary.append(
            {
                "stage": stage,
                "name": stage_rows[0].get("stage_name", ""),
                "steps": f"{stage_rows[0]['step']}-{stage_rows[-1]['step']}",
                "loss_first": sum(r["loss"] for r in head) / len(head),
                "loss_last": sum(r["loss"] for r in tail) / len(tail),
                "samples": sum(r["batch_size"] for r in stage_rows),
                **{c: sum(r[f"active_{c}"] for r in stage_rows) for c in CONDITIONS},
            }
        )
    return summary


def main(argv: list[str]) -> None:
    args = dict(arg.split("=", 1) for arg in argv)
    run_dir = Path(args["run_dir"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    print("\nper stage (active = samples with the condition on):")
    print(
        f"{'stage':<14}{'steps':>9}{'loss first':>12}{'loss last':>11}{'samples':>9}"
        + "".join(f"{c:>7}" for c in CONDITIONS)
    )
    for s in stage_summary(rows):
        print(
            f"{s['stage']} {s['name']:<12}{s['steps']:>9}{s['loss_first']:>12.4f}"
            f"{s['loss_last']:>11.4f}{s['samples']:>9}" + "".join(f"{s[c]:>7}" for c in CONDITIONS)
        )
    print("\noutputs:")
    if "data_dir" in args:
        data = Path(args["data_dir"])
        print(f"  shards        {data / 'shards'} ({len(list((data / 'shards').glob('*.tar')))})")
        print(f"  manifest      {data / 'manifest.jsonl'}")
        print(f"  rejects       {data / 'rejects.jsonl'}")
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    print(
        f"  checkpoints   {run_dir / 'checkpoints'} (newest: "
        f"{ckpts[-1][1].name if ckpts else 'none'})"
    )
    print(f"  metrics       {run_dir / 'metrics.jsonl'} ({len(rows)} rows)")
    print(f"  config        {run_dir / 'config.yaml'}")
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if wandb_runs:
        print(f"  W&B (offline) {wandb_runs[-1]}  (upload: wandb sync {wandb_runs[-1]})")
    if "sample" in args:
        print(f"  sample        {args['sample']}")
    if "seconds" in args:
        print(f"\ndone in {args['seconds']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
