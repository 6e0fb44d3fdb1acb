"""Loader throughput on the sample corpus's shards, against a plain webdataset + PyAV read.

Figures (one in-process consumer, i.e. one DataLoader worker's share of the work):
  loader      samples/s of build_loader (decode window frames + reference + 16 kHz audio,
              resize/crop, keypoints), the smoke experiment's data settings
  plain       samples/s of webdataset.WebDataset iterating the same shards and decoding
              every video frame to RGB and the audio track at 16 kHz with PyAV (the floor)
  latents     samples/s in precomputed-latent mode (shards of the same samples holding VAE
              latents of the smoke window instead of mp4: nothing is decoded)
  resume      seconds to resume deep into a stream (tar headers only, nothing decoded)
Run: .venv/bin/python benchmarks/bench_loader.py [SHARD_GLOB]
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from omni_train.data import DataConfig, build_loader

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 60


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


def plain_rate(pattern: str, samples: int) -> float:
    import webdataset as wds

    urls = sorted(glob.glob(pattern))
    stream = itertools.cycle([0])  # repeat the shards until enough samples were read

    def read_all():
        for _ in stream:
            yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)

    started, count = time.perf_counter(), 0
    for sample in read_all():
        with av.open(io.BytesIO(sample["mp4"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with av.open(io.BytesIO(sample["mp4"])) as container:
            if container.streams.audio:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
                audio = [
                    r.to_ndarray() for f in container.decode(audio=0) for r in resampler.resample(f)
                ]
                np.concatenate(audio, axis=-1) if audio else None
        assert frames
        count += 1
        if count == samples:
            break
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
    state["workers"][0]["yielded"] = position_samples
    started = time.perf_counter()
    next(iter(build_loader(cfg, 0, 1, seed=0, state=state)))
    return time.perf_counter() - started


def main() -> None:
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 thread there)
    pattern = corpus_shards()
    cfg = DataConfig(shards=pattern, resolution=[64, 64], num_frames=17, fps=8.0, batch_size=2)
    print(f"shards: {pattern}")
    plain_rate(pattern, 4)  # warm up PyAV
    ours = loader_rate(cfg, SAMPLES)
    plain = plain_rate(pattern, SAMPLES)
    print(f"loader (1 worker)          {ours:8.1f} samples/s")
    print(f"plain webdataset + PyAV    {plain:8.1f} samples/s")
    print(f"ratio loader / plain       {ours / plain:8.2f}")
    latents_cfg = DataConfig(
        shards=latent_shards(pattern), num_frames=17, fps=8.0, batch_size=2, precomputed=True
    )
    latents = loader_rate(latents_cfg, SAMPLES * 10)
    print(f"precomputed latents        {latents:8.1f} samples/s")
    print(f"ratio latents / plain      {latents / plain:8.2f}")
    deep = resume_seconds(cfg, 100_000)
    print(f"resume at sample 100000    {deep:8.3f} s (headers only; includes one decoded batch)")
    print(f"ratio resume / batch time  {deep / (cfg.batch_size / ours):8.2f}")


if __name__ == "__main__":
    main()
