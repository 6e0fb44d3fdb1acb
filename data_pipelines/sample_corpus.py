"""Make a small, deterministic corpus of synthetic talking / moving figures, offline.

    python -m data_pipelines.sample_corpus out_dir=DIR [seed=N num_clips=N voice=synthetic]

Per clip NAME.mp4 (H.264 25 fps + AAC 16 kHz mono), NAME.txt (caption; the close-up kind has
none) and NAME.pose.json (the COCO-17 keypoints actually drawn), plus broken.mp4, a corrupt
file that the shard job must reject. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from data_pipelines.config import SampleCorpusConfig, register_configs
from data_pipelines.media import encode_mp4
from data_pipelines.scenes import ClipPlan, plan_clip, render_frame
from data_pipelines.voice import frame_envelope, near_silence, speech

log = logging.getLogger(__name__)


def render_clip(plan: ClipPlan, cfg: SampleCorpusConfig) -> tuple[np.ndarray, np.ndarray, list]:
    """Frames (T, H, W, 3) uint8, audio (S,) float32 and per-frame keypoints of one clip."""
    num_frames = round(plan.kind.seconds * cfg.fps)
    audio_rng = np.random.default_rng([cfg.seed, plan.index, 1])
    if plan.kind.speaking:
        audio = speech(audio_rng, plan.kind.seconds, cfg.audio_sample_rate, cfg.voice)
    else:
        audio = near_silence(audio_rng, plan.kind.seconds, cfg.audio_sample_rate)
    envelope = frame_envelope(audio, cfg.audio_sample_rate, cfg.fps, num_frames)
    # The jaw lags and smooths the sound a little, as a real one does.
    mouth = np.convolve(envelope, [0.25, 0.5, 0.25], mode="same")
    if not plan.kind.lips_follow_voice:
        mouth = np.zeros_like(mouth)
    frames, keypoints = [], []
    for i in range(num_frames):
        frame, points = render_frame(plan, i / cfg.fps, float(mouth[i]))
        frames.append(frame)
        keypoints.append(points)
    return np.stack(frames), audio, keypoints


def write_clip(plan: ClipPlan, cfg: SampleCorpusConfig, out_dir: Path) -> list[Path]:
    frames, audio, keypoints = render_clip(plan, cfg)
    video_path = out_dir / f"{plan.name}.mp4"
    video_path.write_bytes(encode_mp4(frames, cfg.fps, audio, cfg.audio_sample_rate, crf=18))
    pose_path = out_dir / f"{plan.name}.pose.json"
    pose = {"format": "coco17", "fps": float(cfg.fps), "frames": keypoints}
    pose_path.write_text(json.dumps(pose, separators=(",", ":")) + "\n", encoding="utf-8")
    written = [video_path, pose_path]
    if plan.caption is not None:
        caption_path = out_dir / f"{plan.name}.txt"
        caption_path.write_text(plan.caption + "\n", encoding="utf-8")
        written.append(caption_path)
    return written


def write_broken(out_dir: Path, seed: int, healthy_mp4: Path) -> Path:
    """A file that starts like an mp4 and then turns into garbage (no index, no frames)."""
    rng = np.random.default_rng([seed, 999])
    head = healthy_mp4.read_bytes()[:1024]
    path = out_dir / "broken.mp4"
    path.write_bytes(head + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def make_sample_corpus(cfg: SampleCorpusConfig) -> list[Path]:
    """Write the corpus into ``cfg.out_dir``; returns the written paths in order."""
    if cfg.num_clips < 1:
        raise ValueError(f"num_clips={cfg.num_clips}: the corpus needs at least one clip")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index in range(cfg.num_clips):
        written += write_clip(plan_clip(index, cfg.seed), cfg, out_dir)
    if cfg.write_broken:
        written.append(write_broken(out_dir, cfg.seed, written[0]))
    return written


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample_corpus")
def main(raw: DictConfig) -> None:
    if OmegaConf.is_missing(raw, "out_dir"):
        log.error("out_dir is required: python -m data_pipelines.sample_corpus out_dir=DIR")
        sys.exit(2)
    cfg: SampleCorpusConfig = OmegaConf.to_object(raw)
    written = make_sample_corpus(cfg)
    for path in written:
        log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    clips = sum(path.suffix == ".mp4" and path.name != "broken.mp4" for path in written)
    log.info(
        "sample corpus: %d clips (+ broken.mp4 to exercise rejects) in %s",
        clips,
        Path(cfg.out_dir).resolve(),
    )


if __name__ == "__main__":
    main()
