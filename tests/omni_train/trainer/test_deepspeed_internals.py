"""DeepSpeed's private names the trainer relies on (omni_train/trainer/deepspeed_internals.py)
exist in the installed release, and that release is in the range pyproject.toml supports.
An upgrade that renames one fails here, not as a silently wrong gradient or checkpoint."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from omni_train.trainer import deepspeed_internals as internals

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("omni_train", "data_pipelines")


def _declared_range() -> SpecifierSet:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith("deepspeed"))
    return SpecifierSet(spec.removeprefix("deepspeed"))


def test_the_installed_release_is_in_the_declared_range():
    import deepspeed

    assert Version(deepspeed.__version__) in _declared_range()


def _assigned_attributes(cls: type) -> set[str]:
    """``self.NAME = ...`` targets anywhere in the class's source."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for inner in ast.walk(node):
                targets = getattr(inner, "targets", None) or [getattr(inner, "target", None)]
                for target in targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        if target.value.id == "self":
                            names.add(target.attr)
    return names


@pytest.mark.parametrize("stage", ["stage_1_and_2", "stage3"])
def test_the_gradient_buffers_a_skipped_step_clears_exist(stage):
    if stage == "stage3":
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Optimizer
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Optimizer
    attributes = _assigned_attributes(Optimizer)
    wanted = internals.FLAT_GRADIENT_BUFFERS[stage] + internals.PER_GROUP_GRADIENTS[stage]
    assert set(wanted) <= attributes, f"{Optimizer.__name__} lacks {set(wanted) - attributes}"


def test_the_engine_members_used_exist():
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert callable(DeepSpeedEngine._zero3_consolidated_16bit_state_dict)
    assert "micro_steps" in _assigned_attributes(DeepSpeedEngine)


def test_the_cpu_backend_builds_its_shm_op_where_it_is_skipped():
    import sys

    import deepspeed.comm.torch  # noqa: F401

    assert callable(sys.modules["deepspeed.comm.torch"].build_shm_op)


def test_the_pickled_optimizer_classes_import():
    assert [c.__name__ for c in internals.pickled_optimizer_classes()] == [
        "LossScaler",
        "ZeroStageEnum",
        "fragment_address",
    ]


def test_no_other_module_reaches_into_deepspeed_internals():
    """Private DeepSpeed attributes (``._name``) and deep imports stay in one module."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "deepspeed_internals.py":
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "deepspeed."
                ):
                    offenders.append(f"{path.relative_to(REPO)}: from {node.module} import")
                if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                    base = ast.unparse(node.value)
                    if "engine" in base or "optimizer" in base or "deepspeed" in base:
                        if not node.attr.startswith("__"):
                            offenders.append(f"{path.relative_to(REPO)}: {base}.{node.attr}")
    allowed = {"omni_train/trainer/universal.py: from deepspeed.checkpoint import"}
    assert set(offenders) <= allowed, "\n".join(sorted(set(offenders) - allowed))
