"""Draw a config's curriculum schedule as a PNG, to check an ablation before it runs.

    python -m omni_train.curriculum.plot out=schedule.png [train overrides]
    python -m omni_train.curriculum.plot out=smoke.png experiment=smoke curriculum.stages.1.ratios.audio=0.1

The arguments are those of ``omni_train.train`` (same config tree), plus ``out=PNG`` and
optionally ``steps=N`` (default: trainer.max_steps). One panel per condition shows the
probability that it is active for a strong-tier and a weak-tier sample at every step (ramps
and CFG dropout included), with the stage boundaries; the table printed on stdout gives the
same numbers at the start and end of each stage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from omni_train.contracts import CONDITIONS, TRAINABLE_TIERS
from omni_train.curriculum.config import CurriculumConfig
from omni_train.curriculum.schedule import effective_ratio, validate_curriculum

_STYLE = {"strong": "-", "weak": "--"}


def schedule_table(cfg: CurriculumConfig, steps: int) -> list[dict]:
    """Per stage: name, first and last step, and each condition's probability per tier."""
    rows = []
    for i, stage in enumerate(cfg.stages):
        if stage.start_step >= steps:
            break
        last = (cfg.stages[i + 1].start_step if i + 1 < len(cfg.stages) else steps) - 1
        last = min(last, steps - 1)
        row = {"stage": i + 1, "name": stage.name, "first": stage.start_step, "last": last}
        for cond in CONDITIONS:
            for tier in TRAINABLE_TIERS:
                row[f"{cond}_{tier}"] = effective_ratio(cfg, last, cond, tier)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'stage':<16}{'steps':>15}" + "".join(f"{c + ' s/w':>13}" for c in CONDITIONS)
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[f'{c}_strong']:>7.2f}/{r[f'{c}_weak']:<5.2f}" for c in CONDITIONS)
        lines.append(f"{r['stage']} {r['name']:<14}{r['first']:>7}-{r['last']:<7}{cells}")
    return "\n".join(lines)


def plot_schedule(cfg: CurriculumConfig, steps: int, out: str | Path, title: str = "") -> Path:
    """Write the schedule of ``cfg`` over ``steps`` optimizer steps to the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validate_curriculum(cfg)
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    xs = np.unique(np.linspace(0, steps - 1, num=min(steps, 2000)).round().astype(int))
    fig, axes = plt.subplots(len(CONDITIONS), 1, figsize=(9, 7), sharex=True)
    for ax, cond in zip(axes, CONDITIONS, strict=True):
        for tier in TRAINABLE_TIERS:
            ys = [effective_ratio(cfg, int(x), cond, tier) for x in xs]
            ax.plot(xs, ys, _STYLE[tier], label=f"{tier} tier", drawstyle="steps-post")
        for stage in cfg.stages[1:]:
            if stage.start_step < steps:
                ax.axvline(stage.start_step, color="grey", linewidth=0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(cond)
        ax.grid(alpha=0.3)
    for stage in cfg.stages:
        if stage.start_step < steps:
            axes[0].annotate(
                stage.name, (stage.start_step, 1.05), fontsize=8, va="bottom", annotation_clip=False
            )
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title or "probability that a condition is active, per quality tier", y=0.995)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from omni_train.config import compose_train_config

    args = list(sys.argv[1:] if argv is None else argv)
    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), "")
    steps_arg = next((a.split("=", 1)[1] for a in args if a.startswith("steps=")), "")
    overrides = [a for a in args if not a.startswith(("out=", "steps="))]
    if not out:
        print("usage: python -m omni_train.curriculum.plot out=PNG [steps=N] [overrides]")
        return 2
    if not any(a.startswith("run_dir=") for a in overrides):
        overrides.append("run_dir=unused")  # required by the schema, not used for a plot
    cfg, _ = compose_train_config(overrides)
    steps = int(steps_arg) if steps_arg else cfg.trainer.max_steps
    try:
        path = plot_schedule(cfg.curriculum, steps, out, title=f"experiment={cfg.experiment}")
    except ValueError as err:
        print(f"invalid curriculum: {err}", file=sys.stderr)
        return 2
    print(format_table(schedule_table(cfg.curriculum, steps)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
