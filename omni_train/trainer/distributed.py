"""Process-group set-up from the torchrun / slurm environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from omni_train.trainer.deepspeed_internals import skip_cpu_shm_op


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_rank_environment(env: dict[str, str]) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR for one process per task started by srun or
    the Hydra submitit launcher (no torchrun); empty when torchrun already set them."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    job_port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    if int(env.get("SLURM_NTASKS", "1")) < 2:
        # One rank still opens a rendezvous port: a fixed default would collide with any
        # other one-rank job on the node (e.g. the points of a sweep).
        return {} if "MASTER_PORT" in env else {"MASTER_PORT": job_port}
    found = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
    }
    if "MASTER_ADDR" not in env:
        found["MASTER_ADDR"] = first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in env:
        found["MASTER_PORT"] = job_port
    return found


def first_host(nodelist: str) -> str:
    """The first host of a slurm node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first


def prepare_environment() -> None:
    """Settings that must be in place before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(slurm_rank_environment(dict(os.environ)))
    # A single process started without torchrun still forms a (1-rank) group.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(backend: str, timeout_minutes: int, cpu_shm_comm: bool) -> DistInfo:
    prepare_environment()
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not use_cuda and not cpu_shm_comm:
        skip_cpu_shm_op()
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
