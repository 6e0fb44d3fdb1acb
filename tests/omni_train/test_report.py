"""The run report: the single-run stage table and the multi-run ablation table + PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni_train.report import compare_runs, find_run_dirs, main, stage_summary


def train_row(step, stage, loss):
    row = {"step": step, "stage": stage, "stage_name": f"s{stage}", "loss": loss, "batch_size": 2}
    row.update({f"active_{c}": 1 for c in ("text", "ref", "audio", "pose")})
    return row


def write_run(path: Path, audio_ratio: float, val: list[dict], eval_summary: dict | None) -> None:
    path.mkdir(parents=True)
    rows = [{"step": 0, **val[0]}, train_row(1, 0, 1.0), train_row(2, 1, 0.8)]
    rows[2].update(val[1])
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(
        f"run_dir: {path}\nseed: 0\nmodel:\n  name: tiny\n"
        f"curriculum:\n  stages:\n  - ratios:\n      audio: {audio_ratio}\n"
    )
    if eval_summary is not None:
        (path / "eval").mkdir()
        (path / "eval" / "eval.json").write_text(json.dumps({"summary": eval_summary}))
    # a checkpoint's config.yaml is not a run
    ckpt = path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text("seed: 0\n")
    (ckpt / "complete.json").write_text("{}")


def summary(psnr, lo, hi):
    entry = {"mean": psnr, "ci95": [lo, hi], "n": 4}
    return {
        "generated": {"psnr": entry, "identity_distance": {"mean": None, "reason": "no face"}},
        "real": {"psnr": {"mean": None}, "ssim": {"mean": 1.0, "ci95": None}},
        "static_reference": {"psnr": {"mean": 20.0, "ci95": [19.0, 21.0]}},
    }


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    write_run(
        root / "audio_0.1",
        0.1,
        [
            {"val/loss": 1.5, "val/loss_audio": 1.6},
            {"val/loss": 0.9, "val/loss_audio": 1.1, "val/loss_audio/strong": 1.2},
        ],
        summary(12.5, 12.0, 13.0),
    )
    write_run(root / "audio_0.5", 0.5, [{"val/loss": 1.4}, {"val/loss": 0.7}], None)
    return root


def test_ablation_table_shows_overrides_final_val_losses_and_eval_metrics(sweep):
    assert find_run_dirs([sweep]) == [sweep / "audio_0.1", sweep / "audio_0.5"]
    text, png = compare_runs([str(sweep)])
    lines = text.splitlines()
    header = lines[0].split()
    assert header == [
        "run",
        "overrides",
        "val/loss",
        "val/loss_audio",
        "eval/psnr",
        "eval/identity_distance",
    ]
    assert lines[1].split() == [
        "audio_0.1",
        "curriculum.stages.0.ratios.audio=0.1",
        "0.9",
        "1.1",
        "12.5±0.5",
        "n/a",
    ]
    assert lines[2].split() == [
        "audio_0.5",
        "curriculum.stages.0.ratios.audio=0.5",
        "0.7",
        "-",
        "-",
        "-",
    ]
    assert lines[3].startswith("baselines (from audio_0.1's eval")
    assert lines[4].split() == ["real:", "psnr=n/a", "ssim=1"]
    assert lines[5].split() == ["static_reference:", "psnr=20±1"]
    assert png == sweep / "val_loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per tier / per timestep keys only on request
    text, _ = compare_runs([str(sweep)], out=str(sweep / "all.png"), all_val_keys=True)
    assert text.splitlines()[0].split()[2:5] == [
        "val/loss",
        "val/loss_audio",
        "val/loss_audio/strong",
    ]
    assert text.splitlines()[1].split()[2:5] == ["0.9", "1.1", "1.2"]


def test_run_dirs_can_be_given_one_by_one_and_the_png_path_chosen(sweep, tmp_path, capsys):
    main([str(sweep / "audio_0.5"), str(sweep / "audio_0.1"), f"out={tmp_path / 'c.png'}"])
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("audio_0.5")
    assert (tmp_path / "c.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2


def test_stage_summary_skips_validation_only_rows():
    rows = [{"step": 0, "val/loss": 2.0}, train_row(1, 0, 1.0), train_row(2, 0, 0.5)]
    (stage,) = stage_summary(rows)
    assert stage["steps"] == "1-2" and stage["loss_first"] == 0.75 and stage["samples"] == 4


def test_single_run_mode_prints_the_stage_table_and_final_val_loss(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.report", f"run_dir={sweep / 'audio_0.1'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 s0                1-1      1.0000     1.0000        2" in proc.stdout
    assert "final validation loss: val/loss=0.9000  val/loss_audio=1.1000\n" in proc.stdout
