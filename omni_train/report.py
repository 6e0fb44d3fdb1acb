"""Summarise runs.

One run, as the demo ends (per curriculum stage, and where the outputs are):

    python -m omni_train.report run_dir=DIR [data_dir=DIR] [sample=MP4] [seconds=N]

Several runs of an ablation (run dirs, or the parent folder of a multirun: every folder below
it holding metrics.jsonl or config.yaml is a run), one table: each run's overrides (the config
keys whose values differ among the runs, run_dir aside), its final validation loss per task
(the last value of every `val/*loss*` key of metrics.jsonl) and the generated clips' eval
metrics from RUN_DIR/eval/eval.json (`python -m omni_train.evaluate` writes there by
default), mean +- the 95 % interval's half-width. Also writes a PNG of the validation-loss
curves (out=PNG; default: val_loss.png in the runs' common parent folder). The table and the
PNG show val/loss and the per-task val/loss_TASK keys; val=all shows every val/*loss* key
(per tier, per timestep):

    python -m omni_train.report RUN_DIR [RUN_DIR...] [out=PNG] [val=all]
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from omni_train.contracts import CONDITIONS
from omni_train.trainer.checkpoint import complete_checkpoints
from omni_train.trainer.metrics import read_metrics

EVAL_JSON = Path("eval") / "eval.json"
# The table's and the PNG's validation losses: the overall one and one per task
# (val/loss, val/loss_text, ...); `val=all` shows every val/*loss* key (tiers, timesteps).
TASK_VAL_KEY = re.compile(r"^val/loss(_[A-Za-z]+)?$")
# Keys that differ between any two runs without being an ablation choice.
NOT_OVERRIDES: tuple[str, ...] = ("run_dir",)


def training_rows(rows: list[dict]) -> list[dict]:
    """Rows of training steps (validation-only rows carry no ``loss``)."""
    return [row for row in rows if "loss" in row]


def stage_summary(rows: list[dict]) -> list[dict]:
    """Per stage: steps, first/last loss (mean of up to 5 rows) and activation totals."""
    by_stage: dict[int, list[dict]] = defaultdict(list)
    for row in training_rows(rows):
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


# ----------------------------------------------------------------------------- several runs
def is_val_loss(key: str) -> bool:
    return key.startswith("val/") and "loss" in key


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path if it is a run dir, else the run dirs below it (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder: pass run dirs or a multirun folder")
        if _is_run_dir(path):
            found.append(path)
            continue
        below = sorted(
            {
                p.parent
                for name in ("metrics.jsonl", "config.yaml")
                for p in path.rglob(name)
                if _is_run_dir(p.parent)
            }
        )
        if not below:
            raise FileNotFoundError(f"{path} holds no run dir (a folder with metrics.jsonl)")
        found.extend(below)
    return list(dict.fromkeys(found))


def _is_run_dir(path: Path) -> bool:
    if (path / "metrics.jsonl").is_file():
        return True
    # A checkpoint folder holds a config.yaml too; it is not a run.
    return (
        (path / "config.yaml").is_file()
        and path.parent.name != "checkpoints"
        and not (path / "complete.json").exists()
    )


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf}, the keys Hydra overrides use."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        items = enumerate(value)
    else:
        return {prefix[:-1]: value}
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(flatten(child, f"{prefix}{key}."))
    return out


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values are not the same in every run (absent counts as a value)."""
    keys = sorted({k for cfg in configs for k in cfg} - set(NOT_OVERRIDES))
    missing = object()
    return [
        k
        for k in keys
        if len({json.dumps(cfg.get(k, missing), default=str, sort_keys=True) for cfg in configs})
        > 1
    ]


def final_val_losses(rows: list[dict]) -> dict[str, float]:
    """The last logged value of every validation-loss key."""
    final: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if is_val_loss(key) and value is not None:
                final[key] = value
    return final


def val_curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if is_val_loss(key) and value is not None:
                steps, values = curves.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return curves


def read_eval(run_dir: Path) -> dict | None:
    path = run_dir / EVAL_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    return {
        "run_dir": run_dir,
        "config": read_config(run_dir),
        "rows": rows,
        "val": final_val_losses(rows),
        "eval": read_eval(run_dir),
    }


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_metric(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry.get("mean") is None:
        return "n/a"
    text = f"{entry['mean']:.4g}"
    if entry.get("ci95"):
        lo, hi = entry["ci95"]
        text += f"±{(hi - lo) / 2:.2g}"
    return text


def shown_val_key(key: str, all_keys: bool) -> bool:
    return all_keys or bool(TASK_VAL_KEY.match(key))


def ablation_rows(
    runs: list[dict[str, Any]], names: list[str], all_val_keys: bool = False
) -> tuple[list[str], list[list]]:
    """(header, one row of cells per run) of the ablation table."""
    overrides = differing_keys([run["config"] for run in runs])
    val_keys = sorted({k for run in runs for k in run["val"] if shown_val_key(k, all_val_keys)})
    eval_keys = list(
        dict.fromkeys(
            k for run in runs if run["eval"] for k in run["eval"]["summary"].get("generated", {})
        )
    )
    header = ["run", "overrides", *val_keys, *(f"eval/{k}" for k in eval_keys)]
    table = []
    for name, run in zip(names, runs, strict=True):
        cells = [
            name,
            " ".join(f"{k}={format_value(run['config'].get(k, '<absent>'))}" for k in overrides)
            or "-",
        ]
        cells += [format_value(run["val"][k]) if k in run["val"] else "-" for k in val_keys]
        summary = run["eval"]["summary"].get("generated", {}) if run["eval"] else {}
        cells += [format_metric(summary.get(k)) if run["eval"] else "-" for k in eval_keys]
        table.append(cells)
    return header, table


def format_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def baseline_lines(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The baselines' means from the first run with an eval (the same clips score the same)."""
    for name, run in zip(names, runs, strict=True):
        if run["eval"]:
            lines = [f"baselines (from {name}'s eval; higher/lower is better per metric):"]
            for candidate in ("real", "static_reference"):
                metrics = run["eval"]["summary"].get(candidate, {})
                cells = " ".join(f"{k}={format_metric(v)}" for k, v in metrics.items())
                lines.append(f"  {candidate}: {cells}")
            return lines
    return []


def plot_val_curves(
    runs: list[dict[str, Any]], names: list[str], out: Path, all_val_keys: bool = False
) -> Path | None:
    """One panel per validation-loss key, one line per run; None when no run has any."""
    curves = {name: val_curves(run["rows"]) for name, run in zip(names, runs, strict=True)}
    keys = sorted(
        {k for per_run in curves.values() for k in per_run if shown_val_key(k, all_val_keys)}
    )
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, per_run in curves.items():
            if key in per_run:
                steps, values = per_run[key]
                ax.plot(steps, values, marker="o", markersize=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare_runs(
    paths: list[str], out: str | None = None, all_val_keys: bool = False
) -> tuple[str, Path | None]:
    """The ablation table as text, and the PNG written (None without validation losses)."""
    run_dirs = find_run_dirs(paths)
    parent = Path(os.path.commonpath([str(p.resolve()) for p in run_dirs]))
    if len(run_dirs) == 1:
        parent = parent.parent
    names = [str(p.resolve().relative_to(parent)) for p in run_dirs]
    runs = [run_summary(p) for p in run_dirs]
    header, rows = ablation_rows(runs, names, all_val_keys)
    text = "\n".join([format_table(header, rows), *baseline_lines(runs, names)])
    png = plot_val_curves(runs, names, Path(out) if out else parent / "val_loss.png", all_val_keys)
    return text, png


# ----------------------------------------------------------------------------- one run
def single_run(args: dict[str, str]) -> None:
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
    val = {k: v for k, v in final_val_losses(rows).items() if shown_val_key(k, False)}
    if val:
        print("\nfinal validation loss: " + "  ".join(f"{k}={v:.4f}" for k, v in val.items()))
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
    print(f"  metrics       {run_dir / 'metrics.jsonl'} ({len(training_rows(rows))} steps)")
    print(f"  config        {run_dir / 'config.yaml'}")
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if wandb_runs:
        print(f"  W&B (offline) {wandb_runs[-1]}  (upload: wandb sync {wandb_runs[-1]})")
    if "sample" in args:
        print(f"  sample        {args['sample']}")
    if "seconds" in args:
        print(f"\ndone in {args['seconds']} s")


def main(argv: list[str]) -> None:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    paths = [arg for arg in argv if "=" not in arg]
    if "run_dir" in options and not paths:
        single_run(options)
        return
    if not paths:
        print(__doc__)
        sys.exit(2)
    try:
        text, png = compare_runs(paths, options.get("out"), options.get("val") == "all")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)
    print(f"\nvalidation-loss curves: {png}" if png else "\nno validation loss in any run")


if __name__ == "__main__":
    main(sys.argv[1:])
