"""launch/slurm/shard.sbatch as a real slurm array, merged by a dependent job: the result is
the single-job result, and re-submitting only a failed task leaves finished parts alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipelines.config import SampleCorpusConfig
from data_pipelines.pipeline import part_dir
from data_pipelines.sample_corpus import make_sample_corpus
from data_pipelines.testing import read_jsonl, shard_members
from data_pipelines.workload import read_plan

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SHARD_OVERRIDES = ["annotators=light"]
# The script asks for 16 CPUs and 64G; the test node has 2 CPUs.
SMALL_JOB = ["--cpus-per-task=1", "--mem=1G", "--time=10"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("shard_corpus") / "corpus"
    make_sample_corpus(
        SampleCorpusConfig(out_dir=str(corpus), seed=0, num_clips=6, voice="synthetic")
    )
    return corpus


@pytest.fixture(scope="module")
def single_run(corpus) -> Path:
    """The reference: one non-partitioned shard job over the whole corpus."""
    out = corpus.parent / "single"
    done = subprocess.run(
        [sys.executable, "-m", "data_pipelines.shard", f"input_dir={corpus}",
         f"output_dir={out}", "progress=false", *SHARD_OVERRIDES],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture
def submitted() -> Iterator[list[str]]:
    """Job ids a test submitted; the ones still queued or running when it ends are cancelled
    (a merge whose array failed would otherwise wait in the queue for ever)."""
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:
        if set(job_states(job_id)) - FINISHED:
            subprocess.run(["scancel", job_id], check=False)


def job_states(job_id: str) -> list[str]:
    """JobState of every task of a job (or array); [] once slurm has forgotten it."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return re.findall(r"JobState=(\S+)", shown.stdout)


def wait_finished(slurm, job_id: str, log: Path | None = None) -> list[str]:
    def finished():
        states = job_states(job_id)
        if slurm.job_field(job_id, "Reason") == "DependencyNeverSatisfied":
            raise AssertionError(f"job {job_id} can never start: its dependency failed")
        return states if states and set(states) <= FINISHED else None

    return slurm.wait_for(finished, JOB_TIMEOUT, f"slurm job {job_id}", log=log)


def submit_shard_array(
    slurm, jobs: list[str], corpus: Path, out: Path, array: str, **env: str
) -> str:
    log = out.parent / f"{out.name}-shard-%A_%a.out"
    job_id = slurm.sbatch(
        [f"--array={array}", *SMALL_JOB, f"--output={log}",
         "launch/slurm/shard.sbatch", str(corpus), str(out), *SHARD_OVERRIDES],
        slurm.job_env(**env),
    )  # fmt: skip
    jobs.append(job_id)
    return job_id


def submit_merge(slurm, jobs: list[str], out: Path, after: str) -> tuple[str, Path]:
    log = out.parent / f"{out.name}-merge.out"
    job_id = slurm.sbatch(
        [*SMALL_JOB, f"--output={log}", f"--dependency=afterok:{after}",
         "--wrap", f"{sys.executable} -m data_pipelines.merge output_dir={out}"],
        slurm.job_env(),
    )  # fmt: skip
    jobs.append(job_id)
    return job_id, log


def array_logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in out.parent.glob(f"{out.name}-shard-*"))


def merge_and_wait(slurm, jobs: list[str], out: Path, after: str) -> None:
    merge_id, log = submit_merge(slurm, jobs, out, after)
    states = wait_finished(slurm, merge_id, log)
    assert states == ["COMPLETED"], array_logs(out) + log.read_text(errors="replace")


def without_shard(rows: list[dict]) -> list[dict]:
    """Manifest rows minus their shard name (the merge numbers shards part by part)."""
    return sorted(({k: v for k, v in row.items() if k != "shard"} for row in rows),
                  key=lambda row: row["key"])  # fmt: skip


def assert_same_as_single(merged: Path, single: Path) -> None:
    manifest = read_jsonl(merged / "manifest.jsonl")
    assert without_shard(manifest) == without_shard(read_jsonl(single / "manifest.jsonl"))
    by_source = lambda rows: sorted(rows, key=lambda r: r["source"])  # noqa: E731
    assert by_source(read_jsonl(merged / "rejects.jsonl")) == by_source(
        read_jsonl(single / "rejects.jsonl")
    )
    stats, single_stats = (json.loads((d / "stats.json").read_text()) for d in (merged, single))
    for key in ("inputs", "inputs_sharded", "inputs_rejected", "clips", "sharded", "quality"):
        assert stats[key] == single_stats[key], key
    assert shard_members(merged) == shard_members(single)  # the same sample bytes, key by key
    for row in manifest:
        assert row["key"] in keys_in(merged / row["shard"]), row


def keys_in(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {member.name.split(".", 1)[0] for member in tar}


def file_snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """{relative path: (inode, mtime_ns, bytes)} of every file under folder."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_array_and_merge_job_equal_the_single_job(slurm, submitted, corpus, single_run, tmp_path):
    out = tmp_path / "array"
    array_id = submit_shard_array(slurm, submitted, corpus, out, "0-1")
    merge_and_wait(slurm, submitted, out, array_id)
    assert job_states(array_id) == ["COMPLETED", "COMPLETED"]
    assert sorted(p.name for p in (out / "parts").iterdir() if p.is_dir()) == [
        "part_0000-of-0002",
        "part_0001-of-0002",
    ]
    # The duration-balanced plan the tasks shared gave both of them work.
    plan = read_plan(out / "parts", 2)
    assert set(plan.assignment.values()) == {0, 1}
    assert_same_as_single(out, single_run)


def test_resubmitting_a_failed_task_keeps_the_finished_part(
    slurm, submitted, corpus, single_run, tmp_path
):
    out = tmp_path / "retry"
    part0, part1 = (part_dir(out, p, 2) for p in (0, 1))
    # A real failure of task 1 alone: a file where its part folder must go.
    part1.parent.mkdir(parents=True)
    part1.write_text("in the way\n")
    array_id = submit_shard_array(slurm, submitted, corpus, out, "0-1")
    wait_finished(slurm, array_id)
    task_states = [slurm.job_field(f"{array_id}_{task}", "JobState") for task in (0, 1)]
    assert task_states == ["COMPLETED", "FAILED"], array_logs(out)
    assert (part0 / "stats.json").is_file()
    before = file_snapshot(part0)
    assert any(name.endswith(".tar") for name in before)

    part1.unlink()
    # As the script's header says: a partial array needs the full partition count.
    retry_id = submit_shard_array(slurm, submitted, corpus, out, "1", NUM_PARTITIONS="2")
    merge_and_wait(slurm, submitted, out, retry_id)
    assert job_states(retry_id) == ["COMPLETED"]
    assert file_snapshot(part0) == before
    assert (part1 / "stats.json").is_file()
    assert_same_as_single(out, single_run)
