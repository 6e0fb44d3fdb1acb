"""Evaluation cost per clip-second, split into generation and metric time.

Evaluates an untrained `experiment=smoke` checkpoint (tiny model, 64x64, 8 fps) on sample-
corpus shards with every metric enabled (a metric without weights reports "not measured"
quickly, so its time is the cost of finding that out), and prints seconds of work per second
of generated video: generation, and each metric over its three candidates. The floor of the
generation is the denoiser's forward passes alone (the same number of calls and batch as the
sampler makes, on random latents); its ratio shows the cost of the VAE, the encoders and the
loop around them.

    .venv/bin/python benchmarks/bench_evaluate.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

NUM_CLIPS = 2
SAMPLING_STEPS = 10


def make_checkpoint(root: Path) -> tuple[Path, str]:
    from data_pipelines.testing import build_sample_shards
    from omni_train.config import compose_train_config
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.models.weights import save_safetensors

    data = build_sample_shards(root, num_clips=NUM_CLIPS)
    shards = f"{data}/shards/*.tar"
    cfg, resolved = compose_train_config(
        ["experiment=smoke", f"run_dir={root}/run", f"data.shards={shards}"]
    )
    folder = root / "run" / "checkpoints" / "step_00000000"
    folder.mkdir(parents=True)
    save_safetensors(build_denoiser(cfg.model).state_dict(), folder / "model.safetensors")
    save_safetensors(build_frozen_encoders(cfg.model).state_dict(), folder / "frozen.safetensors")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (folder / "complete.json").write_text(json.dumps({"step": 0}))
    return root / "run", shards


@torch.no_grad()
def forward_floor(checkpoint: Path, frames_generated: list[int]) -> float:
    """Seconds of the denoiser's forward calls alone for the given generation lengths."""
    from omni_train.contracts import latent_frames
    from omni_train.diffusion.sampler import segment_starts
    from omni_train.runs import load_run

    run = load_run(checkpoint)
    data, diffusion = run.cfg.data, run.cfg.diffusion
    guided = not (diffusion.cfg_text == diffusion.cfg_text_end == 1.0) or not (
        diffusion.cfg_audio == diffusion.cfg_audio_end == 1.0
    )
    batch = 3 if guided else 1
    latents = latent_frames(data.num_frames)
    h, w = (size // 8 for size in data.resolution)
    channels = run.cfg.model.vae.latent_channels
    x = torch.randn(batch, channels, latents, h, w)
    text, mask = run.encoders.encode_text(["a person"] * batch)
    ref = torch.randn(batch, channels, 1, h, w)
    audio = torch.randn(batch, data.num_frames, run.encoders.audio.dim)
    on = {c: torch.ones(batch, dtype=torch.bool) for c in ("text", "ref", "audio", "pose")}
    on["pose"] = ~on["pose"]
    calls = sum(
        len(segment_starts(n, data.num_frames, diffusion.motion_frames)) * SAMPLING_STEPS
        for n in frames_generated
    )
    run.denoiser(x, torch.full((batch,), 0.5), text, mask, ref, audio, None, on)
    start = time.perf_counter()
    for i in range(calls):
        run.denoiser(
            x,
            torch.full((batch,), 0.5),
            text,
            mask,
            ref,
            audio,
            None,
            on,
            num_motion_latents=0 if i % 2 == 0 else 2,
        )
    return time.perf_counter() - start


def main() -> None:
    from omni_train.evaluation.config import EvaluateConfig
    from omni_train.evaluation.harness import evaluate

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, shards = make_checkpoint(Path(tmp))
        cfg = EvaluateConfig(
            checkpoint=str(checkpoint),
            shards=shards,
            out=f"{tmp}/eval",
            num_clips=NUM_CLIPS,
            sampling_steps=SAMPLING_STEPS,
            grid=False,
            wandb=False,
        )
        evaluate(cfg)
        timings = json.loads(Path(f"{tmp}/eval/timings.json").read_text())
        clips = timings["clips"]
        seconds = sum(c["seconds_generated"] for c in clips)
        generation = sum(c["generation_s"] for c in clips)
        frames = [round(c["seconds_generated"] * 8.0) for c in clips]
        floor = forward_floor(checkpoint, frames)
    print(f"clips: {len(clips)}, {seconds:.2f} s of video at 64x64, {SAMPLING_STEPS} steps")
    print(f"model load                 {timings['model_load_s']:8.2f} s")
    print(
        f"generation                 {generation / seconds:8.3f} s per clip-second "
        f"(floor: denoiser forwards alone {floor / seconds:.3f}; ratio {generation / floor:.2f}x)"
    )
    for name in clips[0]["metrics_s"]:
        spent = sum(c["metrics_s"][name] for c in clips)
        print(f"metric {name:<19} {spent / seconds:8.3f} s per clip-second (3 candidates)")
    for name, spent in timings["set_metrics_s"].items():
        print(f"set metric {name:<15} {spent / seconds:8.3f} s per clip-second (3 candidate sets)")
    print(f"total                      {timings['total_s']:8.2f} s")


if __name__ == "__main__":
    main()
