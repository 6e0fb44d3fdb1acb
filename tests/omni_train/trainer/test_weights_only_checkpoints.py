"""DeepSpeed's ``.pt`` files are loaded weights-only on resume and in the universal conversion:
a real 2-rank checkpoint resumes to the saved weights (on 2 ranks, and on 1 through the
universal conversion), and one whose optimizer state carries a pickled call is refused, naming
it, without making the call."""

from __future__ import annotations

import logging
import os
import pickle
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from omni_train.testing import run_ranks
from omni_train.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)
# What a pickled os.mkdir call names: "GLOBAL posix.mkdir" on Linux.
MKDIR_GLOBAL = rf"GLOBAL {os.mkdir.__module__}\.mkdir"


def _engine(zero_stage: int, precision: str, seed: int, load_universal: bool = False):
    from omni_train.trainer.config import TrainerConfig
    from omni_train.trainer.ds_config import deepspeed_config
    from omni_train.trainer.run_setup import build_engine

    trainer_cfg = TrainerConfig(zero_stage=zero_stage, precision=precision)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    world_size = int(os.environ["WORLD_SIZE"])  # set by run_ranks
    ds_cfg = deepspeed_config(trainer_cfg, 2, world_size, load_universal=load_universal)
    engine, _ = build_engine(model, model.parameters(), trainer_cfg, ds_cfg)
    return engine


def _weights(engine) -> dict[str, list]:
    return {k: v.float().tolist() for k, v in engine.module.state_dict().items()}


def _save_in_rank(root: str, zero_stage: int, precision: str) -> dict[str, list]:
    """One training step, then a checkpoint saved the trainer's way; returns the weights."""
    import torch.distributed as dist

    from omni_train.trainer.checkpoint_manager import stage_checkpoint

    engine = _engine(zero_stage, precision, seed=0)
    batch = torch.randn(2, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = engine(batch.to(next(engine.module.parameters()).dtype)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    staging = stage_checkpoint(engine, Path(root), 1, dist.get_rank() == 0)
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt.publish(staging, {"step": 1, "world_size": dist.get_world_size()})
    dist.barrier()
    weights = _weights(engine)
    dist.destroy_process_group()
    return weights


def _resume_in_rank(run_dir: str, zero_stage: int, precision: str) -> dict[str, list]:
    """A freshly initialised engine (another seed) resumed through load_resumed."""
    import torch.distributed as dist

    from omni_train.trainer.checkpoint_manager import load_resumed
    from omni_train.trainer.distributed import DistInfo
    from omni_train.trainer.run_state import plan_resume

    root = Path(run_dir) / "checkpoints"
    plan = plan_resume(root, seed=0)
    world_size = int(os.environ["WORLD_SIZE"])
    engine = _engine(zero_stage, precision, seed=1, load_universal=plan.resized(world_size))
    info = DistInfo(dist.get_rank(), world_size, dist.get_rank(), torch.device("cpu"))
    load_resumed(engine, plan, plan.resized(world_size), info, root, Path(run_dir), log)
    weights = _weights(engine)
    dist.destroy_process_group()
    return weights


class _MakeDirectory:
    """Unpickling this calls os.mkdir(path): the stand-in for code hidden in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _poison(checkpoint: Path, marker: Path) -> None:
    """Add a pickled os.mkdir(marker) call to every optimizer-state file of ``checkpoint``."""
    files = sorted(checkpoint.glob("*optim_states.pt"))
    assert files, sorted(p.name for p in checkpoint.iterdir())
    for path in files:
        state = torch.load(path, weights_only=False)  # the test's own, trusted file
        state["note"] = _MakeDirectory(marker)
        torch.save(state, path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict, int, str]:
    """(run dir, saved weights, zero stage, precision) of a 2-rank run saved after one step.

    ZeRO-2 fp32 (the default) pickles all three classes of pickled_optimizer_classes(); bf16
    and ZeRO-1/3 pickle the same ones or fewer (test_elastic_resume.py resumes ZeRO-3)."""
    zero_stage, precision = 2, "fp32"
    run_dir = tmp_path_factory.mktemp(f"run_zero{zero_stage}_{precision}")
    weights = run_ranks(_save_in_rank, 2, str(run_dir / "checkpoints"), zero_stage, precision)
    assert weights[0] == weights[1]
    return run_dir, weights[0], zero_stage, precision


def _copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to)
    return to


def test_deepspeed_files_load_weights_only(saved):
    run_dir, _, _, _ = saved
    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints")
    files = sorted(checkpoint.glob("*.pt"))
    assert any("optim_states" in p.name for p in files) and any("model" in p.name for p in files)
    with ckpt.weights_only_loads():
        for path in files:
            torch.load(path, weights_only=False)  # forced weights-only: DeepSpeed's own call
    for path in files:
        refused = pytest.raises(pickle.UnpicklingError, match="GLOBAL deepspeed")
        with refused if "optim" in path.name else nullcontext():
            torch.load(path, weights_only=True)  # without the allowed DeepSpeed classes


def test_resume_loads_the_saved_weights(saved, tmp_path):
    run_dir, weights, zero_stage, precision = saved
    run_dir = _copy_run(run_dir, tmp_path / "run")
    resumed = run_ranks(_resume_in_rank, 2, str(run_dir), zero_stage, precision)
    assert resumed == [weights, weights]


def test_resume_refuses_a_pickled_call_without_making_it(saved, tmp_path):
    run_dir, _, zero_stage, precision = saved
    run_dir = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "made_by_the_checkpoint"
    _poison(ckpt.latest_checkpoint(run_dir / "checkpoints"), marker)
    with pytest.raises(RuntimeError, match=rf"(?s)UnpicklingError.*{MKDIR_GLOBAL}"):
        run_ranks(_resume_in_rank, 2, str(run_dir), zero_stage, precision)
    assert not marker.exists()


def test_universal_conversion_loads_weights_only(saved, tmp_path):
    from omni_train.trainer.universal import convert_to_universal

    run_dir, weights, zero_stage, precision = saved
    run_dir = _copy_run(run_dir, tmp_path / "run")
    # Resuming on 1 rank converts the 2-rank checkpoint, then loads the universal copy.
    assert run_ranks(_resume_in_rank, 1, str(run_dir), zero_stage, precision) == [weights]

    poisoned = _copy_run(run_dir, tmp_path / "poisoned")
    marker = tmp_path / "made_by_the_checkpoint"
    checkpoint = ckpt.latest_checkpoint(poisoned / "checkpoints")
    _poison(checkpoint, marker)
    with pytest.raises(RuntimeError, match=rf"(?s){MKDIR_GLOBAL}.*resume with the world"):
        convert_to_universal(checkpoint, tmp_path / "fresh_run")
    assert not marker.exists()
