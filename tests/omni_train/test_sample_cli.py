"""Sampling inputs: checkpoint resolution, output length, bad input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omni_train.sample import output_frames, resolve_checkpoint


def test_output_length_follows_seconds_or_audio_and_spans_two_segments():
    assert output_frames(4.0, 10.0, 8.0, 17) == 32
    assert output_frames(0.0, 10.0, 8.0, 17) == 80
    assert output_frames(1.0, 10.0, 8.0, 17) == 29  # never fewer than two segments


def test_checkpoint_resolves_from_a_run_dir_and_skips_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "complete.json").write_text(json.dumps({"step": step}))
    assert resolve_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(root / "step_00000002").name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_cli_reports_a_missing_checkpoint_clearly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni_train.sample",
            f"checkpoint={tmp_path}",
            f"ref_image={tmp_path}/a.png",
            f"audio={tmp_path}/a.wav",
            f"out={tmp_path}/o.mp4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "checkpoint=" in proc.stdout + proc.stderr
