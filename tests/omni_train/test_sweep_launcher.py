"""hydra/launcher=slurm_gpu composes with the train config, renders the sbatch script that
submitit would submit, and a 2-point sweep runs through submitit's local executor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
submitit = pytest.importorskip("submitit")

from omni_train.testing import CONF_DIR  # noqa: E402

REPO = CONF_DIR.parent
SWEEP = ["trainer.optimizer.lr=1e-4,3e-4"]


@pytest.fixture(autouse=True)
def _unset_hydra_config():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None  # the tests set the job's hydra config by hand


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode

    from omni_train.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        sweep = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        # One job of the sweep: the first value of every swept override.
        first = [re.sub(r"=([^,]*),.*$", r"=\1", o) if o in SWEEP else o for o in overrides]
        job = compose("train", overrides=first, return_hydra_config=True)
    return sweep, job


def _required(tmp_path: Path) -> list[str]:
    return [
        "hydra/launcher=slurm_gpu",
        "data.shards=/data/shards/*.tar",
        "run_dir=/runs/sweep/${hydra:job.num}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]


def test_slurm_gpu_composes_with_the_train_config_in_multirun_mode(tmp_path):
    from omegaconf import OmegaConf

    sweep, job = _compose([*_required(tmp_path), *SWEEP])
    launcher = sweep.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout > 0
    # The warning must leave time for a step and a checkpoint save before the kill.
    assert launcher.signal_delay_s >= 120
    assert launcher.submitit_folder == f"{tmp_path / 'sweep'}/.submitit/%j"
    # The sweep itself is left to the sweeper: every job gets one value.
    task = OmegaConf.to_container(sweep.hydra.overrides.task, resolve=False)
    assert "trainer.optimizer.lr=1e-4,3e-4" in task
    assert job.hydra.launcher._target_ == launcher._target_


def test_run_dirs_and_sweep_subdirs_are_per_job(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    _, cfg = _compose(_required(tmp_path))
    resolved = set()
    for num in (0, 1):
        with read_write(cfg.hydra.job), open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
        run_dir = OmegaConf.select(cfg, "run_dir")
        subdir = OmegaConf.select(cfg, "hydra.sweep.subdir")
        resolved.add((run_dir, subdir))
    assert resolved == {("/runs/sweep/0", "0"), ("/runs/sweep/1", "1")}


def test_the_sbatch_script_asks_for_a_signal_the_trainer_handles(tmp_path, monkeypatch):
    """Drive the launcher's own launch() with submitit's slurm executor, stopping at sbatch."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from omni_train.trainer.config import PreemptionConfig

    sweep, _ = _compose(_required(tmp_path))
    HydraConfig.instance().set_config(sweep)
    scripts: list[str] = []

    class RenderingExecutor(submitit.AutoExecutor):
        def map_array(self, fn, *iterables):
            scripts.append(self._executor._make_submission_file_text("python -u job.py", "0"))
            return []

    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a script
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit, "AutoExecutor", RenderingExecutor)
    launcher = instantiate(sweep.hydra.launcher)
    launcher.config = sweep
    assert launcher.launch([["trainer.optimizer.lr=1e-4"]], initial_job_idx=0) == []
    (script,) = scripts
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1440",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    ):
        assert line in script, line
    sent = re.search(r"^#SBATCH --signal=(\w+)@(\d+)$", script, re.M)
    assert sent is not None, script
    assert int(sent.group(2)) == 300
    assert sent.group(1) == "USR2"
    assert signal.Signals[f"SIG{sent.group(1)}"].name in PreemptionConfig().signals


@pytest.mark.slow
def test_a_two_point_sweep_runs_through_the_local_submitit_executor(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").touch()  # check_only validates the glob, it does not read shards
    cmd = [
        sys.executable,
        "-m",
        "omni_train.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=2",
        "check_only=true",
        f"data.shards={shards}/*.tar",
        f"run_dir={tmp_path}/runs/" + "${hydra:job.num}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *SWEEP,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    logs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2
    text = [log.read_text() for log in logs]
    runs = sorted(re.search(r"^run_dir: (.+)$", t, re.M).group(1) for t in text)
    assert runs == [f"{tmp_path}/runs/0", f"{tmp_path}/runs/1"]
    lrs = sorted(float(re.search(r"^    lr: (.+)$", t, re.M).group(1)) for t in text)
    assert lrs == [1e-4, 3e-4]
