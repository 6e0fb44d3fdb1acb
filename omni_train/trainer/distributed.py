"""Process-group set-up from the torchrun / slurm environment."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_environment() -> None:
    """Settings that must be in place before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A single process started without torchrun still forms a (1-rank) group.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(backend: str, timeout_minutes: int, cpu_shm_comm: bool) -> DistInfo:
    prepare_environment()
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - registers the module patched below

    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not use_cuda and not cpu_shm_comm:
        # Through sys.modules: the attribute `deepspeed.comm.torch` is the torch package
        # itself (re-exported by a star import), not DeepSpeed's backend module.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world_size, local_rank, device)
