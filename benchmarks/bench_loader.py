"""Loader throughput on the sample corpus's shards, against the same work done plainly.

Figures (one in-process consumer, i.e. one DataLoader worker's share of the work):
  loader      samples/s of build_loader (per sample: read json + mp4 from the tar, pick a
              window and a reference frame, decode the video up to the last frame needed,
              resize/crop those frames, decode + resample the audio track to 16 kHz and cut
              the window's audio, map the keypoints; then collate), the smoke experiment's
              data settings
  same work   samples/s of that per-sample work written as one straight loop over the tars
              (tarfile, json, PyAV, numpy, the same torch resize; no workers, no prefetch,
              no shuffle buffer, no resumable position; on the sample corpus its tensors
              equal decode_sample's bit for bit given the same random draws): the floor the
              loader is compared to
  latents     samples/s in precomputed-latent mode (shards of the same samples holding VAE
              latents of the smoke window instead of mp4: nothing is decoded)
  resume      seconds to resume deep into a stream (tar headers only, nothing decoded)
Loader and floor alternate for ROUNDS rounds and the median rate of each is reported.
Run: .venv/bin/python benchmarks/bench_loader.py [SHARD_GLOB]
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from omni_train.data import DataConfig, build_loader

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 60
ROUNDS = 3


def corpus_shards() -> str:
    """The demo's shards when present, else the sample corpus sharded into a temp dir."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    demo = ROOT / os.environ.get("DEMO_DIR", "demo_out") / "data" / "shards"
    if glob.glob(str(demo / "*.tar")):
        return str(demo / "*.tar")
    out = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    for args in (
        ["data_pipelines.sample_corpus", f"out_dir={out}/corpus"],
        ["data_pipelines.shard", f"input_dir={out}/corpus", f"output_dir={out}/data"],
    ):
        subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True)
    return str(out / "data" / "shards" / "*.tar")


def loader_rate(cfg: DataConfig, samples: int) -> float:
    loader = build_loader(cfg, 0, 1, seed=0)
    batches = iter(loader)
    next(batches)  # index the shards outside the timing
    started = time.perf_counter()
    for _ in range(samples // cfg.batch_size):
        next(batches)
    return samples / (time.perf_counter() - started)


def raw_samples(pattern: str) -> Iterator[tuple[bytes, dict]]:
    """(mp4 bytes, parsed json) of every sample of the shards, in order, forever."""
    for _ in itertools.count():
        for path in sorted(glob.glob(pattern)):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    if ext in ("mp4", "json"):
                        members.setdefault(key, {})[ext] = tar.extractfile(info).read()
            for sample in members.values():
                yield sample["mp4"], json.loads(sample["json"])


def same_work_sample(mp4: bytes, meta: dict, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """The loader's per-sample work (omni_train.data.decode) written out plainly."""
    import torch
    import torch.nn.functional as F

    clip_frames, clip_fps = int(meta["num_frames"]), float(meta["fps"])
    offsets = [round(j * clip_fps / cfg.fps) for j in range(cfg.num_frames)]
    start = int(rng.integers(0, clip_frames - offsets[-1]))
    window = [start + offset for offset in offsets]
    outside = [i for i in range(clip_frames) if i < window[0] or i > window[-1]]
    ref = int(outside[rng.integers(0, len(outside))]) if outside else window[0]
    wanted, frames = {*window, ref}, {}
    with av.open(io.BytesIO(mp4)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= max(wanted):
                break
    pixels = torch.from_numpy(np.stack([frames[i] for i in [*window, ref]]))
    pixels = pixels.permute(0, 3, 1, 2).float()
    (height, width), (out_h, out_w) = pixels.shape[-2:], cfg.resolution
    scale = max(out_h / height, out_w / width)
    size = (max(out_h, round(height * scale)), max(out_w, round(width * scale)))
    pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)
    top, left = (size[0] - out_h) // 2, (size[1] - out_w) // 2
    pixels = pixels[..., top : top + out_h, left : left + out_w]
    pixels = (pixels / 127.5 - 1.0).clamp(-1.0, 1.0)
    audio = np.zeros(cfg.audio_samples, np.float32)
    with av.open(io.BytesIO(mp4)) as container:
        if container.streams.audio:
            rate = cfg.audio_sample_rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [
                out.to_ndarray().reshape(-1)
                for frame in [*container.decode(audio=0), None]
                for out in resampler.resample(frame)
            ]
            begin = round(start / clip_fps * rate)
            piece = np.concatenate(chunks)[begin : begin + cfg.audio_samples]
            audio[: len(piece)] = piece
    keypoints = np.zeros((cfg.num_frames, 17, 3), np.float32)
    if meta.get("keypoints") is not None:
        keypoints = np.asarray(meta["keypoints"], np.float32)[window]
        keypoints[..., 0] = (keypoints[..., 0] * size[1] - left) / out_w
        keypoints[..., 1] = (keypoints[..., 1] * size[0] - top) / out_h
        x, y, visible = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2] > 0
        kept = visible & (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
        keypoints = np.where(kept[..., None], keypoints, 0.0).astype(np.float32)
    return {
        "video": pixels[:-1].permute(1, 0, 2, 3),
        "ref": pixels[-1],
        "audio": torch.from_numpy(audio),
        "keypoints": torch.from_numpy(keypoints),
    }


def same_work_rate(pattern: str, cfg: DataConfig, samples: int) -> float:
    import torch

    rng = np.random.default_rng(0)
    started, batch = time.perf_counter(), []
    for mp4, meta in itertools.islice(raw_samples(pattern), samples):
        batch.append(same_work_sample(mp4, meta, cfg, rng))
        if len(batch) == cfg.batch_size:
            {name: torch.stack([sample[name] for sample in batch]) for name in batch[0]}
            batch = []
    return samples / (time.perf_counter() - started)


def latent_shards(pattern: str) -> str:
    """The same samples with (4, 5, 8, 8) float16 latents (the smoke window) instead of mp4."""
    import tarfile

    out = Path(tempfile.mkdtemp(prefix="bench_latents_"))
    rng = np.random.default_rng(0)

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as src, tarfile.open(out / Path(path).name, "w") as dst:
            for info in src:
                key, ext = info.name.split(".", 1)
                if ext != "json":
                    continue
                members = {
                    "json": src.extractfile(info).read(),
                    "latents.npy": npy(rng.standard_normal((4, 5, 8, 8)).astype(np.float16)),
                    "ref_latents.npy": npy(rng.standard_normal((4, 1, 8, 8)).astype(np.float16)),
                    "audio.npy": npy(np.zeros(34_000, np.float32)),
                }
                for name, payload in members.items():
                    member = tarfile.TarInfo(f"{key}.{name}")
                    member.size = len(payload)
                    dst.addfile(member, io.BytesIO(payload))
    return str(out / "*.tar")


def resume_seconds(cfg: DataConfig, position_samples: int) -> float:
    loader = build_loader(cfg, 0, 1, seed=0)
    next(iter(loader))
    state = loader.state_dict()
    state["workers"][0].update(
        yielded=position_samples, picks=position_samples, sources=[position_samples]
    )
    started = time.perf_counter()
    next(iter(build_loader(cfg, 0, 1, seed=0, state=state)))
    return time.perf_counter() - started


def main() -> None:
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 thread there)
    pattern = corpus_shards()
    cfg = DataConfig(shards=pattern, resolution=[64, 64], num_frames=17, fps=8.0, batch_size=2)
    print(f"shards: {pattern}")
    same_work_rate(pattern, cfg, 4)  # warm up PyAV and torch
    rates: dict[str, list[float]] = {"loader": [], "same": []}
    for _ in range(ROUNDS):
        rates["loader"].append(loader_rate(cfg, SAMPLES))
        rates["same"].append(same_work_rate(pattern, cfg, SAMPLES))
    ours, same = statistics.median(rates["loader"]), statistics.median(rates["same"])
    print(f"loader (1 worker)              {ours:8.1f} samples/s")
    print(f"same work, plain loop (floor)  {same:8.1f} samples/s")
    print(f"ratio loader / floor           {ours / same:8.2f}")
    latents_cfg = DataConfig(
        shards=latent_shards(pattern), num_frames=17, fps=8.0, batch_size=2, precomputed=True
    )
    latents = loader_rate(latents_cfg, SAMPLES * 10)
    print(f"precomputed latents            {latents:8.1f} samples/s")
    print(f"ratio latents / floor          {latents / same:8.2f}")
    deep = resume_seconds(cfg, 100_000)
    print(
        f"resume at sample 100000        {deep:8.3f} s (headers only; includes one decoded batch)"
    )
    print(f"ratio resume / batch time      {deep / (cfg.batch_size / ours):8.2f}")


if __name__ == "__main__":
    main()
