"""Seeded fault injection: every random choice of a fault test (the step to kill at, the point
of a save to kill in) comes from ``fault_rng``, seeded by OMNI_FAULT_SEED (default 0).

The seed is attached to the test's report, so a failing fault test prints the line to replay
it with, e.g. ``OMNI_FAULT_SEED=7 .venv/bin/pytest tests/omni_train/trainer/test_fault_tolerance.py``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping

import pytest

FAULT_SEED_ENV = "OMNI_FAULT_SEED"
DEFAULT_FAULT_SEED = 0


def fault_seed(environ: Mapping[str, str] = os.environ) -> int:
    """OMNI_FAULT_SEED as an integer, DEFAULT_FAULT_SEED when unset or empty."""
    raw = environ.get(FAULT_SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_FAULT_SEED
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{FAULT_SEED_ENV}={raw!r} is not an integer: set e.g. {FAULT_SEED_ENV}=7, or unset "
            f"it for the default seed {DEFAULT_FAULT_SEED}"
        ) from None


class FaultRandom(random.Random):
    """random.Random that remembers how to replay it: ``replay`` goes into assert messages."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.replay = f"{FAULT_SEED_ENV}={seed}"


@pytest.fixture
def fault_rng(request) -> FaultRandom:
    """A fresh FaultRandom(OMNI_FAULT_SEED) per test (so a choice does not depend on which
    tests ran before); the seed goes into the test's report, shown with any failure."""
    rng = FaultRandom(fault_seed())
    print(f"fault seed: {rng.replay}")
    request.node.add_report_section("call", "fault seed", f"{rng.replay} replays this test")
    return rng
