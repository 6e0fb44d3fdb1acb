"""Per-rank state saved beside the DeepSpeed files: RNG streams and the resume plan.

Losses do not depend on these RNG streams (every step's noise comes from a generator seeded
by (seed, step, rank, micro-batch)), but anything else that draws from the global streams
(dropout, user code) resumes exactly too. Everything is JSON: no pickles in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_train.trainer import checkpoint as ckpt


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


def loader_file(rank: int) -> str:
    return f"loader_rank{rank:05d}.json"


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def resized_data_seed(seed: int, step: int) -> int:
    """The loader seed after a world-size change: a fresh, reproducible order of the data."""
    digest = hashlib.sha1(f"resize:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class ResumePlan:
    """What the newest complete checkpoint asks of this start."""

    checkpoint: Path
    step: int
    saved_world_size: int
    data_seed: int
    meta: dict[str, Any]

    def resized(self, world_size: int) -> bool:
        return self.saved_world_size != world_size


def plan_resume(ckpt_root: Path, seed: int) -> ResumePlan | None:
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is None:
        return None
    meta = ckpt.read_meta(latest)
    return ResumePlan(
        checkpoint=latest,
        step=int(meta["step"]),
        saved_world_size=int(meta["world_size"]),
        data_seed=int(meta.get("data_seed", seed)),
        meta=meta,
    )


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
