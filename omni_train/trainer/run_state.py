"""The run state a checkpoint keeps beside DeepSpeed's files, and the resume plan.

Each piece is checkpoint state in the sense of torch's ``Stateful`` protocol
(``state_dict()`` / ``load_state_dict()``): the counters (``TrainState``, saved in
complete.json) and every rank's global random streams (``RNGState``). Losses do not depend on
these RNG streams (every step's noise comes from a generator seeded by (seed, step, rank,
micro-batch)), but anything else that draws from the global streams (dropout, user code)
resumes exactly too. Everything is JSON: no pickles in checkpoints.
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


class RNGState:
    """This process's global random streams (python, numpy, torch, cuda) as checkpoint state."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)


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


@dataclass
class TrainState:
    """The counters a run continues from; its state dict is part of complete.json."""

    step: int = 0  # training steps taken, a step whose update was skipped included
    data_seed: int = 0  # the loader's seed: the run's seed until a resize starts a new order

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data_seed": self.data_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the counters of ``state`` (a checkpoint's meta); one saved without a data
        seed keeps this run's."""
        self.step = int(state["step"])
        self.data_seed = int(state.get("data_seed", self.data_seed))


@dataclass
class DenoiserTrainState(TrainState):
    """TrainState plus the updates the denoiser trainer skipped for a non-finite loss (the
    VAE trainer stops at the first one instead)."""

    nonfinite_skipped: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "nonfinite_skipped": self.nonfinite_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


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
