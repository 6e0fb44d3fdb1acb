"""Helpers for tests and benchmarks: fork ranks without torchrun, timed runs."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from omni_train.config import CONF_DIR, compose_train_config  # noqa: F401 - tests use them here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank, world_size, port, fn, args, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300) -> list:
    """Run ``fn(*args)`` in ``world_size`` forked ranks with a gloo group's environment.

    Returns each rank's result in rank order; raises with the failing rank's traceback.
    Forking (not spawning) keeps torch and deepspeed imports from being paid again per rank.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    failed = False
    try:
        while len(results) < world_size:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead and queue.empty():
                    raise RuntimeError(f"a rank died with exit code {dead[0]}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout} s") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    except BaseException:
        failed = True
        raise
    finally:
        for proc in procs:
            # After a failure the other ranks may wait in a collective forever: end them now.
            proc.join(timeout=2 if failed else 30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    return [results[r] for r in range(world_size)]


def metric_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``."""
    from omni_train.trainer.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


# The three curriculum stages squeezed into six steps, audio and pose always on where eligible.
SIX_STEP_STAGES: tuple[str, ...] = (
    "curriculum.stages.0.start_step=0",
    "curriculum.stages.1.start_step=2",
    "curriculum.stages.2.start_step=4",
    "curriculum.stages.1.ratios.audio=1.0",
    "curriculum.stages.2.ratios.audio=1.0",
    "curriculum.stages.2.ratios.pose=1.0",
)


# The foundation experiments (wan_smoke, hunyuan_video_smoke) on small clips: 3 latent frames of
# 4 x 4, so their VAEs and models cost little.
SMALL_CLIPS: tuple[str, ...] = ("data.resolution=[32,32]", "data.num_frames=9")


def train_in_rank(overrides: Sequence[str]) -> int:
    """Train `omni_train.train OVERRIDES` in this (forked) rank; returns the last step.

    Meant for ``run_ranks(train_in_rank, world_size, overrides)``.
    """
    import torch.distributed as dist

    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(list(overrides))
    trainer = Trainer(cfg, resolved)
    trainer.run()
    dist.destroy_process_group()
    return trainer.global_step


def train_timed(overrides: Sequence[str]) -> tuple[Any, list[float]]:
    """Train `omni_train.train OVERRIDES` in this (forked) rank, timing every step.

    Returns the Trainer (its process group still up, for more measurements) and the seconds
    of each training step. For benchmarks, under ``run_ranks``.
    """
    from omni_train.trainer.trainer import Trainer

    cfg, resolved = compose_train_config(list(overrides))
    trainer = Trainer(cfg, resolved)
    times: list[float] = []
    original = trainer._train_step

    def timed(batches, flag):
        started = time.perf_counter()
        out = original(batches, flag)
        times.append(time.perf_counter() - started)
        return out

    trainer._train_step = timed
    trainer.run()
    return trainer, times


# Checkpoint layout tests of both trainers.
# The data loader's own format (omni_train/data, whose tests cover reading older states): every
# key earlier versions wrote must still be written; the loader may add keys of its own.
CHECKPOINT_LOADER_KEYS = [
    "batches",
    "corrupt_before",
    "corrupt_skipped",
    "handover",
    "num_shards",
    "num_workers",
    "rank",
    "seed",
    "val_holdout",
    "version",
    "workers",
    "world_size",
]
CHECKPOINT_RNG_KEYS = ["numpy", "python", "torch"]  # and "cuda" on a GPU


# Denoisers in tests: inputs of the tiny model, and a stand-in for pretrained weights.
def denoiser_inputs(model_cfg: Any, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Fixed random inputs of ``OmniDenoiser`` for ``model_cfg`` (17 pixel frames, 64x64
    pixels), every condition on."""
    import torch

    from omni_train.contracts import CONDITIONS, latent_frames

    gen = torch.Generator().manual_seed(seed)
    channels, frames, pixels = model_cfg.vae.latent_channels, 17, 64
    latent = pixels // 8
    return dict(
        noisy=torch.randn(batch, channels, latent_frames(frames), latent, latent, generator=gen),
        timesteps=torch.rand(batch, generator=gen),
        text=torch.randn(batch, 6, model_cfg.text_encoder.d_model, generator=gen),
        text_mask=torch.ones(batch, 6, dtype=torch.bool),
        ref_latents=torch.randn(batch, channels, 1, latent, latent, generator=gen),
        audio_features=torch.randn(
            batch, frames, model_cfg.audio_encoder.feature_dim, generator=gen
        ),
        pose_heatmaps=torch.rand(
            batch, model_cfg.pose_guider.num_keypoints, frames, pixels, pixels, generator=gen
        ),
        active={name: torch.ones(batch, dtype=torch.bool) for name in CONDITIONS},
    )


def pretrained_like(model: Any, seed: int = 0) -> Any:
    """Give ``model``'s all-zero parameters (adaLN-Zero gates, zero-initialised output layers)
    random values, in place, as training would: a random-init MMDiT's output is zero until
    they move, so a frozen one would train nothing."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model
