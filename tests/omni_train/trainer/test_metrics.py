"""MetricsLogger: log() writes metrics.jsonl, W&B and a console line; log_values() the first
two only, so a row without the training keys (the step-0 validation) can be logged."""

from __future__ import annotations

import json
import logging

from omni_train.trainer.config import LoggerConfig, WandbConfig
from omni_train.trainer.metrics import MetricsLogger


class FakeWandbRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        pass


def _logger(tmp_path) -> MetricsLogger:
    cfg = LoggerConfig(wandb=WandbConfig(enabled=False), console_every=1)
    logger = MetricsLogger(cfg, tmp_path, "exp", {}, 0, 10, progress_bar=False)
    logger.wandb_run = FakeWandbRun()
    return logger


def _training_row(step: int) -> dict:
    counts = {f"active_{c}": 1 for c in ("text", "ref", "audio", "pose")}
    return {
        "step": step,
        "stage": 1,
        "stage_name": "text_ref",
        "loss": 0.5,
        "lr": 1e-3,
        "samples_per_s": 2.0,
        "batch_size": 2,
        **counts,
    }


def test_log_values_writes_jsonl_and_wandb_without_a_console_line(tmp_path, caplog):
    logger = _logger(tmp_path)
    caplog.set_level(logging.INFO, logger="omni_train.trainer.metrics")
    val_row = {"step": 0, "stage": 1, "stage_name": "text_ref", "val/loss": 0.25}
    logger.log_values(val_row)
    assert caplog.records == []
    logger.log(_training_row(1))
    assert [r.getMessage().split()[:2] for r in caplog.records] == [["step", "1/10"]]
    run = logger.wandb_run
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [val_row, _training_row(1)]
    assert run.logged == [
        ({"stage": 1, "stage_name": "text_ref", "val/loss": 0.25}, 0),
        ({k: v for k, v in _training_row(1).items() if k != "step"}, 1),
    ]
