"""End to end: evaluate an untrained tiny checkpoint on sample-corpus shards plus two bad clips."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from omni_train.evaluation.config import EvaluateConfig
from omni_train.evaluation.harness import NothingToEvaluate, evaluate
from omni_train.evaluation.suite import MetricsConfig
from omni_train.media import write_mp4

pytestmark = pytest.mark.slow

QUALITY = {"text": "strong", "ref": "strong", "audio": "strong", "pose": "strong"}


def bad_clips_shard(path: Path, tmp: Path) -> None:
    """Clips "0_short": 1 s (shorter than a 17-frame segment at 8 fps); "1_silent": 3 s, no
    audio; "z_nopose": 3 s with audio, no keypoints (sorted after the corpus clips)."""
    members = {}
    clips = (("0_short", 1.0, True), ("1_silent", 3.0, False), ("z_nopose", 3.0, True))
    for key, seconds, audio in clips:
        frames = np.full((int(8 * seconds), 64, 64, 3), 128, np.uint8)
        wave = np.zeros(int(16_000 * seconds), np.float32) + 0.1 if audio else None
        write_mp4(tmp / f"{key}.mp4", frames, 8.0, wave)
        meta = {"fps": 8.0, "num_frames": len(frames), "quality": QUALITY, "caption": "x"}
        members[key] = {"mp4": (tmp / f"{key}.mp4").read_bytes(), "json": json.dumps(meta).encode()}
    with tarfile.open(path, "w") as tar:
        for key, parts in members.items():
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_pipelines.testing import build_sample_shards
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.models.weights import save_safetensors
    from omni_train.testing import compose_train_config

    root = tmp_path_factory.mktemp("eval")
    data = build_sample_shards(root, num_clips=1)
    bad_clips_shard(root / "bad.tar", root)
    cfg, resolved = compose_train_config(
        ["experiment=smoke", f"run_dir={root}/run", f"data.shards={data}/shards/*.tar"]
    )
    torch.manual_seed(0)
    folder = root / "run" / "checkpoints" / "step_00000007"
    folder.mkdir(parents=True)
    save_safetensors(build_denoiser(cfg.model).state_dict(), folder / "model.safetensors")
    save_safetensors(build_frozen_encoders(cfg.model).state_dict(), folder / "frozen.safetensors")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (root / "run" / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (folder / "complete.json").write_text(json.dumps({"step": 7}))
    return root, f"{root}/bad.tar,{data}/shards/*.tar"


def config(root, shards, **overrides):
    """One clip, one sampling step, fidelity only; 17 frames (one segment) unless overridden."""
    base = EvaluateConfig(
        seconds=17 / 8,
        checkpoint=str(root / "run"),
        shards=shards,
        out=str(root / "out"),
        num_clips=1,
        sampling_steps=1,
        grid=False,
        wandb=False,
        metrics=MetricsConfig(enabled=["fidelity"]),
    )
    return replace(base, **overrides)


def test_evaluation_is_repeatable_from_a_run_dir_or_a_step_folder(setup):
    root, shards = setup
    first = evaluate(config(root, shards, grid=True, wandb=True, reference_frame=3))
    report = json.loads(first.read_text())
    first_bytes = first.read_bytes()
    assert report["checkpoint"]["step"] == 7 and report["task"] == "audio"
    assert report["skipped"] == [
        {
            "key": "0_short",
            "reason": "clip shorter than one segment: 8 frames at 8 fps (8 at 8 fps), a segment "
            "is data.num_frames=17",
        },
        {"key": "1_silent", "reason": "no audio track: task=audio needs the clip's audio"},
    ]
    (clip,) = report["clips"]
    assert clip["key"] == sorted(clip["key"] for clip in report["clips"])[0]
    assert (root / "out" / clip["grid"]).is_file()
    assert list((root / "out" / "wandb").glob("offline-run-*"))
    real, static = clip["metrics"]["real"], clip["metrics"]["static_reference"]
    assert real["psnr"]["value"] is None and "infinite" in real["psnr"]["reason"]
    assert real["ssim"]["value"] == 1.0
    assert static["psnr"]["value"] is not None and clip["metrics"]["generated"]["psnr"]["value"]
    summary = report["summary"]
    assert summary["real"]["ssim"]["mean"] == 1.0 and summary["real"]["psnr"]["mean"] is None
    timings = json.loads((root / "out" / "timings.json").read_text())
    assert (
        timings["clips"][0]["generation_s"] > 0 and "fidelity" in timings["clips"][0]["metrics_s"]
    )

    # the static baseline's PSNR, computed here from the decoded clip and frame 3
    from omni_train.evaluation.clips import held_out_clips, to_uint8
    from omni_train.runs import load_run

    run = load_run(root / "run")
    (decoded,) = [
        c for c in held_out_clips(shards, run.cfg.data, "audio", 17, 3) if c.key == clip["key"]
    ]
    pixels = to_uint8(decoded.frames).astype(np.float64)
    expected = 10 * np.log10(255.0**2 / np.mean((pixels[3][None] - pixels) ** 2))
    assert static["psnr"]["value"] == pytest.approx(expected, rel=1e-12)

    # the same config again: byte-identical
    rerun = evaluate(config(root, shards, grid=True, wandb=True, reference_frame=3))
    assert rerun.read_bytes() == first_bytes
    # the step folder the run dir resolves to gives the same numbers
    step = evaluate(
        config(
            root,
            shards,
            reference_frame=3,
            checkpoint=str(root / "run/checkpoints/step_00000007"),
        )
    )
    from_step = json.loads(step.read_text())
    assert from_step["clips"] == [{**clip, "grid": None}]
    assert from_step["summary"] == summary


def test_every_clip_skipped_exits_2_with_the_reasons(setup):
    root, _ = setup
    with pytest.raises(NothingToEvaluate, match="1_silent: no audio track"):
        evaluate(config(root, str(root / "bad.tar"), seconds=0.0, task="pose"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni_train.evaluate",
            f"checkpoint={root / 'run'}",
            f"shards={root / 'bad.tar'}",
            f"out={root / 'cli'}",
            "task=pose",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    output = proc.stdout + proc.stderr
    assert "0_short: clip shorter than one segment" in output
    assert "z_nopose: no keypoints in the clip" in output
    assert not (root / "cli" / "eval.json").exists()


def test_text_task_runs_past_the_clip_into_the_run_dirs_eval_folder(setup, monkeypatch):
    root, _ = setup
    from omni_train.evaluation import harness
    from omni_train.report import compare_runs

    calls = []

    def recording(*args, **kwargs):
        calls.append((args[6], kwargs["task"]))  # total frames, task
        return generate(*args, **kwargs)

    generate = harness.generate_long_video
    monkeypatch.setattr(harness, "generate_long_video", recording)
    cfg = config(root, str(root / "bad.tar"), task="text", seconds=4.0, out="")
    path = evaluate(cfg)
    assert calls == [(32, "text")]
    assert path == root / "run" / "eval" / "eval.json"
    report = json.loads(path.read_text())
    (clip,) = report["clips"]
    assert clip["key"] == "1_silent" and report["skipped"][0]["key"] == "0_short"
    assert report["conditions"] == ["text", "ref"]
    # 4 s at 8 fps = 32 frames from a 3 s clip: fidelity on the 24-frame overlap
    assert (clip["frames_real"], clip["frames_generated"]) == (24, 32)
    assert clip["segments"] == [[0, 17], [17, 29], [29, 32]]
    assert report["protocol"]["clips_generated_past_their_end"] == ["1_silent"]
    assert clip["metrics"]["generated"]["psnr"]["value"] is not None
    # `omni_train.report RUN_DIR` reads that eval.json
    text, _ = compare_runs([str(root / "run")])
    header, row = text.splitlines()[:2]
    assert header.split()[-2:] == ["eval/psnr", "eval/ssim"]
    psnr = report["summary"]["generated"]["psnr"]["mean"]
    assert row.split()[-2] == f"{psnr:.4g}"


def test_a_missing_checkpoint_or_too_short_generation_fails_before_loading(setup):
    root, shards = setup
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        evaluate(config(root, shards, checkpoint=str(root / "nowhere")))
    with pytest.raises(ValueError, match="seconds=1 gives 8 frames"):
        evaluate(config(root, shards, seconds=1.0))


def test_pose_task_drives_the_model_with_the_clip_keypoints(setup):
    root, shards = setup
    report = json.loads(evaluate(config(root, shards, task="pose")).read_text())
    assert report["conditions"] == ["text", "ref", "audio", "pose"]
    (clip,) = report["clips"]
    assert clip["metrics"]["generated"]["ssim"]["value"] is not None


def test_clips_the_task_or_the_reference_frame_cannot_use_are_skipped_with_reasons(setup):
    root, shards = setup
    from omni_train.evaluation.clips import SkippedClip, held_out_clips
    from omni_train.runs import load_run

    data = load_run(root / "run").cfg.data
    pose = {c.key: c for c in held_out_clips(shards, data, "pose", 17, 0)}
    reason = "no keypoints in the clip: task=pose needs them"
    assert pose["z_nopose"] == SkippedClip("z_nopose", reason)
    usable = [k for k, c in pose.items() if not isinstance(c, SkippedClip)]
    assert usable and all(pose[k].num_frames == 17 for k in usable)
    late = {c.key: c for c in held_out_clips(shards, data, "text", 17, 20)}
    assert late[usable[0]] == SkippedClip(
        usable[0], "reference_frame=20 is past the 17 frames evaluated"
    )
