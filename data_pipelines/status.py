"""Where a shard job stands: one row per partition (or one for a single run), and a total.

    python -m data_pipelines.status output_dir=DIR [stale_after_seconds=600]

A part is ``finished`` (stats.json written, no live status left), ``running`` (its
status.json was updated within ``stale_after_seconds``), ``stale`` (not updated for longer:
its task probably died without a word, e.g. node lost, kill -9 or out of time), ``stopped``
(the run raised, e.g. interrupted), ``behind`` (finished before the plan gave it sources added
later), ``unfinished`` (a folder without status or stats) or ``missing`` (no folder yet).
``failures`` counts sources that failed for the job's sake (``internal_error``,
``worker_crashed``); a re-run retries them. The exit code is 0 whatever the parts' states
(it only reports); 2 for an output_dir that cannot be read as a shard output.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data_pipelines.part_states import (
    PartState,
    array_list,
    format_seconds,
    inspect_parts,
    to_resubmit,
)

log = logging.getLogger(__name__)

COLUMNS = f"{'part':<20}{'state':<11}{'done':>13}{'%':>7}{'clips':>8}{'clips/s':>9}{'ETA':>8}{'failures':>9}  detail"


@dataclass
class StatusConfig:
    output_dir: str = MISSING
    # A running part whose status file has not been updated for this long is "stale".
    stale_after_seconds: float = 600.0


def format_table(states: list[PartState]) -> str:
    lines = [COLUMNS]
    for s in states:
        lines.append(_row(s.name, s.state, s.done, s.total, s.clips, s.clips_per_second,
                          s.eta_seconds, s.failures, s.detail))  # fmt: skip
    running = [s for s in states if s.state == "running"]
    known = [s.total for s in states if s.total is not None]
    finished = sum(s.state == "finished" for s in states)
    etas = [s.eta_seconds for s in running if s.eta_seconds is not None]
    lines.append(
        _row(
            "total",
            f"{finished}/{len(states)} done",
            sum(s.done for s in states),
            sum(known) if len(known) == len(states) else None,
            sum(s.clips for s in states),
            sum(s.clips_per_second or 0.0 for s in running) if running else None,
            max(etas) if etas else None,
            sum(s.failures for s in states),
            "",
        )  # fmt: skip
    )
    resubmit = to_resubmit(states)
    if resubmit:
        lines.append(f"to resubmit: sbatch --array={array_list(resubmit)} ... (NUM_PARTITIONS set)")
    return "\n".join(lines)


def _row(name, state, done, total, clips, rate, eta, failures, detail) -> str:
    fraction = f"{100 * done / total:.1f}" if total else ("100.0" if total == 0 else "-")
    count = f"{done}/{total if total is not None else '?'}"
    rate_text = "-" if rate is None else f"{rate:.2f}"
    return (
        f"{name:<20}{state:<11}{count:>13}{fraction:>7}{clips:>8}{rate_text:>9}"
        f"{format_seconds(eta):>8}{failures:>9}  {detail}"
    ).rstrip()


def show_status(output_dir: Path | str, stale_after_seconds: float = 600.0) -> str:
    output_dir = Path(output_dir).resolve()
    if not output_dir.is_dir():
        raise ValueError(
            f"output_dir={output_dir} is not an existing folder: pass the output_dir of a shard job"
        )
    states = inspect_parts(output_dir, stale_after_seconds)
    if not states:
        return f"{output_dir}: no shard run has started here yet"
    return format_table(states)


ConfigStore.instance().store(name="status_schema", node=StatusConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="status")
def main(raw: DictConfig) -> None:
    if OmegaConf.is_missing(raw, "output_dir"):
        log.error("output_dir is required: python -m data_pipelines.status output_dir=DIR")
        sys.exit(2)
    try:
        print(show_status(raw.output_dir, raw.stale_after_seconds))
    except ValueError as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
