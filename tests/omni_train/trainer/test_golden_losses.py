"""Golden losses: the first steps of a fixed smoke run must give the losses pinned in
golden_losses.json, so a silent change to the numerics (loss, init, optimizer, conditioning,
data decoding) fails here instead of passing every "loss is finite" check.

The run: the 3-clip sample corpus (seed 0) sharded in-process, ``experiment=smoke`` on one
forked rank, fp32 on the CPU with one torch thread, 8 steps with the three curriculum stages
squeezed into them (SIX_STEP_STAGES: audio and pose conditioning train too). Per step the loss
and the gradient norm must match within a relative 1e-5: repeated runs, rebuilt shards
included, are identical to the bit; running on 2 threads (another reduction order, as on
other CPUs) moves them by at most 2.2e-7; scaling the loss by 1.001 moves them by 1e-3.

After an intended change of the numerics, refresh the file deliberately and commit it:

    OMNI_REFRESH_GOLDEN=1 .venv/bin/pytest tests/omni_train/trainer/test_golden_losses.py

which rewrites golden_losses.json (with the overrides, library versions and input
fingerprints that produced it) and skips the comparison, saying so. A failure says whether
the sample shards or the resolved config also differ from the recorded run, which points to
the data pipeline or a changed default rather than the training numerics.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import pytest

from data_pipelines.testing import build_sample_shards
from omni_train.testing import (
    SIX_STEP_STAGES,
    compose_train_config,
    metric_rows,
    run_ranks,
    train_in_rank,
)

pytestmark = pytest.mark.slow

GOLDEN_FILE = Path(__file__).with_name("golden_losses.json")
REFRESH_ENV = "OMNI_REFRESH_GOLDEN"
REFRESH_COMMAND = f"{REFRESH_ENV}=1 .venv/bin/pytest tests/omni_train/trainer/test_golden_losses.py"
CORPUS = {"num_clips": 3, "seed": 0}
STEPS = 8
RTOL = 1e-5
OVERRIDES = [
    "experiment=smoke",
    f"trainer.max_steps={STEPS}",
    "trainer.save_every=100",
    "trainer.precision=fp32",
    "trainer.progress_bar=false",
    "logger.wandb.enabled=false",
    *SIX_STEP_STAGES,
]
PINNED = ("loss", "grad_norm")


def _shards_sha256(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for shard in sorted((data_dir / "shards").glob("*.tar")):
        digest.update(shard.name.encode())
        digest.update(shard.read_bytes())
    return digest.hexdigest()


def _config_sha256(resolved: dict) -> str:
    """The resolved run config, minus the two paths that differ per run."""
    stable = json.loads(json.dumps(resolved))
    stable.pop("run_dir", None)
    stable["data"].pop("shards", None)
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import av
    import deepspeed
    import numpy
    import torch

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "numpy": numpy.__version__,
        "av": av.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }


def _mismatches(got: list[dict], want: list[dict]) -> list[str]:
    lines = []
    for g, w in zip(got, want, strict=True):
        for key in PINNED:
            if g[key] != pytest.approx(w[key], rel=RTOL, abs=0.0):
                rel = abs(g[key] - w[key]) / abs(w[key])
                lines.append(
                    f"  step {w['step']} {key}: {g[key]!r}, golden {w[key]!r} (rel {rel:.2e})"
                )
    return lines


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> dict:
    """Run the pinned configuration once; its per-step values and what produced them."""
    root = tmp_path_factory.mktemp("golden")
    data = build_sample_shards(root / "corpus", **CORPUS)
    paths = [f"run_dir={root / 'run'}", f"data.shards={data / 'shards' / '*.tar'}"]
    _, resolved = compose_train_config([*OVERRIDES, *paths])
    assert run_ranks(train_in_rank, 1, [*OVERRIDES, *paths]) == [STEPS]
    rows = metric_rows(root / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {
        "about": (
            f"First {STEPS} steps of a fixed 1-rank fp32 smoke run, compared within a relative "
            f"{RTOL:g} by tests/omni_train/trainer/test_golden_losses.py. Refresh only after an "
            f"intended change of the numerics: {REFRESH_COMMAND}"
        ),
        "sample_corpus": CORPUS,
        "overrides": OVERRIDES,
        "torch_threads": 1,
        "rtol": RTOL,
        "produced_with": _versions(),
        "fingerprints": {
            "shards_sha256": _shards_sha256(data),
            "config_sha256": _config_sha256(resolved),
        },
        "steps": [{"step": r["step"], **{key: r[key] for key in PINNED}} for r in rows],
    }


def test_first_losses_match_the_golden_file(smoke_run):
    if os.environ.get(REFRESH_ENV, "") not in ("", "0"):
        GOLDEN_FILE.write_text(json.dumps(smoke_run, indent=2) + "\n")
        pytest.skip(f"{REFRESH_ENV} set: rewrote {GOLDEN_FILE} from this run; commit it")
    assert GOLDEN_FILE.is_file(), f"{GOLDEN_FILE} is missing: create it with {REFRESH_COMMAND}"
    golden = json.loads(GOLDEN_FILE.read_text())
    assert golden["overrides"] == smoke_run["overrides"], (
        f"the test's overrides changed since {GOLDEN_FILE.name} was written: {REFRESH_COMMAND}"
    )
    mismatches = _mismatches(smoke_run["steps"], golden["steps"])
    if mismatches:
        inputs = [
            f"  {name}: {'same' if smoke_run['fingerprints'][name] == value else 'DIFFERENT'}"
            for name, value in golden["fingerprints"].items()
        ]
        pytest.fail(
            f"the smoke run's numerics differ from {GOLDEN_FILE.name} (rtol {RTOL:g}):\n"
            + "\n".join(mismatches)
            + "\ninputs compared with the recorded run (a DIFFERENT shards hash points to the "
            "data pipeline, a DIFFERENT config hash to a changed default):\n"
            + "\n".join(inputs)
            + f"\nrecorded with {golden['produced_with']}, now {smoke_run['produced_with']}.\n"
            f"If the change is intended, refresh the file and commit it: {REFRESH_COMMAND}",
            pytrace=False,
        )
