"""The fault tests' random choices replay from OMNI_FAULT_SEED, and a failure names the seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

FAILING_FAULT_TEST = """
def test_draws(fault_rng):
    print("drawn", [fault_rng.randint(1, 1000) for _ in range(5)])
    assert False, fault_rng.replay
"""


def _run_failing_fault_test(tmp_path: Path, seed: str | None) -> str:
    """Output of pytest on a fault test that prints its draws and fails."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_draws.py").write_text(FAILING_FAULT_TEST)
    env = {k: v for k, v in os.environ.items() if k != "OMNI_FAULT_SEED"}
    if seed is not None:
        env["OMNI_FAULT_SEED"] = seed
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout


def _draws(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("drawn"))


def test_a_failing_fault_test_names_its_seed_and_replays_its_draws(tmp_path):
    default = _run_failing_fault_test(tmp_path, None)
    assert "Captured fault seed call" in default
    assert "OMNI_FAULT_SEED=0 replays this test" in default
    assert "AssertionError: OMNI_FAULT_SEED=0" in default
    assert _draws(_run_failing_fault_test(tmp_path, "0")) == _draws(default)
    assert _draws(_run_failing_fault_test(tmp_path, "0")) == _draws(default)
    seven = _run_failing_fault_test(tmp_path, "7")
    assert "OMNI_FAULT_SEED=7 replays this test" in seven
    assert _draws(seven) != _draws(default)


def test_a_bad_seed_is_refused_naming_the_variable():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.fault_seed({}) == 0
    assert module.fault_seed({"OMNI_FAULT_SEED": " 42 "}) == 42
    with pytest.raises(ValueError, match="OMNI_FAULT_SEED='abc' is not an integer"):
        module.fault_seed({"OMNI_FAULT_SEED": "abc"})
