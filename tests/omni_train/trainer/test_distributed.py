"""The rank environment of a process started by srun or submitit without torchrun."""

from __future__ import annotations

from omni_train.trainer.distributed import first_host, slurm_rank_environment


def test_tasks_of_a_step_become_ranks_with_a_port_of_their_job():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
    }
    assert slurm_rank_environment(env) == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": "23456",
    }


def test_one_task_jobs_on_one_node_get_different_ports():
    def env(job_id: str) -> dict[str, str]:
        return {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": job_id}

    assert slurm_rank_environment(env("41")) == {"MASTER_PORT": "20041"}
    assert slurm_rank_environment(env("42")) == {"MASTER_PORT": "20042"}


def test_torchrun_workers_and_explicit_ports_are_left_alone():
    assert slurm_rank_environment({"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == {}
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "MASTER_PORT": "1"}
    assert slurm_rank_environment(one) == {}
    assert first_host("node7,node8") == "node7"
