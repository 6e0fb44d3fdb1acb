"""Two evaluations of the same clips side by side: the table and the stacked mp4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from omni_train.evaluation.compare import columns_of_grid, main, metric_table, val_loss_change
from omni_train.evaluation.grid import write_grid
from omni_train.media import read_video

COLOURS = {"real": (200, 30, 30), "static": (30, 200, 30), "a": (30, 30, 200), "b": (230, 230, 230)}


def _video(colour, frames=5, size=32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (frames, size, size, 3)).copy()


def _entry(mean, half=None, higher=True):
    ci = [mean - half, mean + half] if half is not None else None
    return {"mean": mean, "ci95": ci, "n": 2, "higher_is_better": higher, "method": "m"}


def _eval_dir(root: Path, name: str, generated_colour, psnr: float) -> Path:
    out = root / name
    (out / "grid").mkdir(parents=True)
    clips = []
    for index, key in enumerate(["k1", "k2"]):
        grid = f"grid/{index:03d}_{key}.mp4"
        write_grid(
            out / grid,
            _video(COLOURS["real"]),
            _video(COLOURS["static"]),
            _video(generated_colour),
            8.0,
            np.zeros(8000, np.float32),
        )
        clips.append({"key": key, "grid": grid})
    summary = {
        "real": {"psnr": {"mean": None, "reason": "infinite"}, "ssim": _entry(1.0, 0.0)},
        "static_reference": {"psnr": _entry(20.0, 1.5), "ssim": _entry(0.5, 0.1)},
        "generated": {
            "psnr": _entry(psnr, 0.5),
            "ssim": _entry(0.25),
            "identity_distance": {"mean": None, "reason": "no face", "higher_is_better": False},
        },
    }
    report = {"task": "audio", "protocol": {"fps": 8.0}, "clips": clips, "summary": summary}
    (out / "eval.json").write_text(json.dumps(report))
    return out


def test_table_lists_baselines_then_each_evaluation(tmp_path):
    a = _eval_dir(tmp_path, "untrained", COLOURS["a"], 10.0)
    b = _eval_dir(tmp_path, "trained", COLOURS["b"], 18.25)
    reports = [json.loads((d / "eval.json").read_text()) for d in (a, b)]
    header, rows = metric_table(reports, ["untrained", "trained"])
    assert header == ["metric", "real", "static_reference", "untrained", "trained"]
    assert rows == [
        ["psnr (higher is better)", "n/a", "20 +-1.5", "10 +-0.5", "18.25 +-0.5"],
        ["ssim (higher is better)", "1 +-0", "0.5 +-0.1", "0.25", "0.25"],
    ]  # identity_distance is measured nowhere, so it has no row


def test_video_stacks_clips_with_every_generated_column(tmp_path, capsys):
    a = _eval_dir(tmp_path, "untrained", COLOURS["a"], 10.0)
    b = _eval_dir(tmp_path, "trained", COLOURS["b"], 18.0)
    out = tmp_path / "compare.mp4"
    assert main([str(a), str(b), "labels=before,after", f"out={out}"]) == 0
    assert "before" in capsys.readouterr().out
    frames = read_video(out)
    assert frames.shape == (5, 64, 4 * 32 + 3 * 2, 3)  # 2 clips x (real|static|a|b)
    for row in (frames[:, :32], frames[:, 32:]):
        # The 4 columns, read back by the same layout rule as a 3-column grid plus one.
        width = 32 + 2
        means = [
            row[:, 4:28, i * width + 4 : i * width + 28].mean(axis=(0, 1, 2)) for i in range(4)
        ]
        expected = [COLOURS[name] for name in ("real", "static", "a", "b")]
        for got, want in zip(means, expected, strict=True):
            assert np.abs(got - np.array(want)).max() < 12


def test_columns_of_grid_inverts_the_grid():
    grid = np.concatenate(
        [_video(COLOURS["real"]), np.full((5, 32, 2, 3), 255, np.uint8), _video(COLOURS["static"]),
         np.full((5, 32, 2, 3), 255, np.uint8), _video(COLOURS["a"])], axis=2)  # fmt: skip
    parts = columns_of_grid(grid)
    assert (parts["generated"] == _video(COLOURS["a"])).all()
    assert (parts["static_reference"] == _video(COLOURS["static"])).all()


def test_val_loss_change_from_first_to_last_validation(tmp_path):
    rows = [
        {"step": 0, "stage": 1, "val/loss": 2.0, "val/loss_text": 1.0, "val/loss_t0.5": 9.0},
        {"step": 1, "stage": 1, "loss": 1.0},
        {"step": 5, "stage": 3, "loss": 0.5, "val/loss": 0.5, "val/loss_text": 0.75},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert val_loss_change(tmp_path) == [
        ["validation", "step 0", "step 5", "change"],
        ["val/loss", "2.0000", "0.5000", "-75.0 %"],
        ["val/loss_text", "1.0000", "0.7500", "-25.0 %"],
    ]


def test_missing_eval_json_names_the_command(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "python -m omni_train.evaluate" in capsys.readouterr().err
