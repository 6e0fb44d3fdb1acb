"""The package structure the code relies on: no import cycle between modules, production code
importing neither the test helpers nor a command-line entry point, and every shared
contract (omni_train/contracts.py) defined there only. Read from the source (ast), so it
holds for function-level imports too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("omni_train", "data_pipelines")
TEST_HELPERS = {"omni_train.testing", "data_pipelines.testing"}
# A __main__ that is no command: the universal-checkpoint conversion runs itself in a
# subprocess (so its torch.load stays out of the trainer's process).
INTERNAL_MAIN = {"omni_train.trainer.universal"}
CONTRACT_NAMES = {
    "CONDITIONS", "TIERS", "TRAINABLE_TIERS", "TASK_CONDITIONS", "SHARD_MEMBERS",
    "SPATIAL_STRIDE", "TEMPORAL_STRIDE",
}  # fmt: skip
CONTRACT_FUNCTIONS = {"latent_frames", "pixel_frames", "check_pixel_frames", "key_hash"}
CONDITION_LITERAL = ("text", "ref", "audio", "pose")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_imports(module: str, top_level_only: bool) -> set[str]:
    """Project modules ``module`` imports (a package's __init__ for ``from pkg import x``
    when x is not itself a module)."""
    tree = TREES[module]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _is_entry_point(module: str) -> bool:
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.FunctionDef) and any(
            "hydra.main" in ast.unparse(d) for d in node.decorator_list
        ):
            return True
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            return True
    return False


def test_no_import_cycle_between_modules():
    graph = {m: _project_imports(m, top_level_only=True) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is how packages re-export names,
    # not a cycle between modules of one job.
    cycles = [c for c in cycles if not any(c[i] == c[i + 1].rpartition(".")[0] for i in range(len(c) - 1))]  # fmt: skip
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_production_code_imports_no_test_helper_and_no_entry_point():
    entry_points = {m for m in MODULES if _is_entry_point(m)} - INTERNAL_MAIN
    assert {"omni_train.sample", "omni_train.train", "data_pipelines.shard"} <= entry_points
    upward = []
    for module in MODULES:
        if module in TEST_HELPERS:
            continue
        for target in _project_imports(module, top_level_only=False):
            if target in TEST_HELPERS or (target in entry_points and target != module):
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "omni_train.contracts"))
def test_shared_contracts_are_defined_only_in_contracts(module):
    defined = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in CONTRACT_NAMES:
                    defined.append(f"assigns {target.id}")
        if isinstance(node, ast.FunctionDef) and node.name in CONTRACT_FUNCTIONS:
            defined.append(f"defines {node.name}()")
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            if tuple(e.value for e in node.elts) == CONDITION_LITERAL:
                defined.append(f"spells out the conditions at line {node.lineno}")
    assert not defined, f"{module} {', '.join(defined)}: import it from omni_train.contracts"
