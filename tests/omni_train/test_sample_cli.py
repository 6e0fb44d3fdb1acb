"""Sampling inputs: checkpoint resolution, output length, bad input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omni_train.runs import resolve_checkpoint
from omni_train.sample import output_frames


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


# ----------------------------------------------------------------------------- trust
IMPORT_MARKER_MODULE = """
from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("imported")


def build(cfg):
    raise AssertionError("called")
"""


def _checkpoint(tmp_path, **targets: str):
    """A complete checkpoint folder whose config.yaml (the smoke run's) sets
    model.PART._target_ for each PART=target given."""
    from omegaconf import OmegaConf

    from omni_train.testing import compose_train_config

    _, resolved = compose_train_config(["experiment=smoke", f"run_dir={tmp_path / 'run'}"])
    for part, target in targets.items():
        resolved["model"][part]["_target_"] = target
    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "complete.json").write_text(json.dumps({"step": 2}))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    return folder


def test_a_checkpoint_naming_foreign_code_is_refused_before_it_is_imported(tmp_path, monkeypatch):
    from omni_train.runs import UntrustedCheckpointCode, load_run, read_run_config

    (tmp_path / "foreign_parts.py").write_text(IMPORT_MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = _checkpoint(tmp_path, vae="foreign_parts.build")
    with pytest.raises(UntrustedCheckpointCode) as refused:
        load_run(folder)
    message = str(refused.value)
    assert str(folder / "config.yaml") in message
    assert "model.vae._target_='foreign_parts.build'" in message
    assert "trust_checkpoint_code=true" in message
    assert "foreign_parts" not in sys.modules
    assert not (tmp_path / "imported.marker").exists()

    # Trusted, the same target is imported and called.
    with pytest.raises(AssertionError, match="called"):
        load_run(folder, trust_checkpoint_code=True)
    assert (tmp_path / "imported.marker").exists()

    # A project path that reaches other code through a module attribute is refused too.
    sneaky = _checkpoint(tmp_path / "sneaky", audio_encoder="omni_train.sample.torch.load")
    with pytest.raises(
        UntrustedCheckpointCode,
        match=r"omni_train\.sample\.torch\.load \(defined in torch\.serialization\)",
    ):
        read_run_config(sneaky)


def test_trusted_foreign_targets_and_project_targets_are_built(tmp_path):
    from omni_train.models.adapters import AdapterError
    from omni_train.runs import load_run, read_run_config

    folder = _checkpoint(tmp_path / "a", vae="copy.copy")
    assert read_run_config(folder, trust_checkpoint_code=True).model.vae._target_ == "copy.copy"
    # Called: the adapter check finds the copied VAEConfig where a module belongs.
    with pytest.raises(AdapterError, match="returned VAEConfig, not an nn.Module"):
        load_run(folder, trust_checkpoint_code=True)
    project = _checkpoint(
        tmp_path / "b", audio_encoder="omni_train.models.audio_encoder.AudioEncoder"
    )
    assert read_run_config(project).model.audio_encoder._target_.endswith("AudioEncoder")


def test_evaluation_refuses_foreign_code_before_reading_clips(tmp_path):
    from omni_train.evaluation.config import EvaluateConfig
    from omni_train.evaluation.harness import resolve_target
    from omni_train.runs import UntrustedCheckpointCode

    folder = _checkpoint(tmp_path, text_encoder="os.system")
    cfg = EvaluateConfig(checkpoint=str(folder), shards=str(tmp_path / "none-*.tar"))
    with pytest.raises(
        UntrustedCheckpointCode, match=r"model\.text_encoder\._target_='os\.system'"
    ):
        resolve_target(cfg)
    cfg.trust_checkpoint_code = True
    assert resolve_target(cfg).run_cfg.model.text_encoder._target_ == "os.system"


def test_cli_refuses_foreign_code_with_exit_2_naming_the_flag(tmp_path):
    folder = _checkpoint(tmp_path, vae="os.system")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni_train.sample",
            f"checkpoint={folder}",
            f"ref_image={tmp_path}/a.png",
            f"audio={tmp_path}/a.wav",
            f"out={tmp_path}/o.mp4",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "model.vae._target_='os.system'" in output and "trust_checkpoint_code=true" in output
