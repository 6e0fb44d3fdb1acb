"""Peak memory and throughput of shard-only on long sources: 1, 4 and 16 minutes of 640x360
25 fps talk-like video with audio (written by the bench itself), sharded at fps=25
max_side=512 annotators=light, each in a fresh process so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_shard_memory.py [MINUTES ...]

The decoder streams (data_pipelines/decoding.py): peak RSS should not grow with the source's
length. It prints each run's peak RSS, wall and CPU time, clips per second and the
real-time factor, and the 16-minute peak as a ratio to the 1-minute one (target: <= 1.10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIGHT = {"motion": "frame_diff", "speech": "energy", "pose": "sidecar", "face": "sidecar"}

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from data_pipelines.config import ShardConfig, default_annotators
from data_pipelines.pipeline import run_shard
nodes = default_annotators()
for name, backend in json.loads(sys.argv[4]).items():
    nodes[name] = {**nodes[name], "backend": backend}
cfg = ShardConfig(input_dir=sys.argv[2], output_dir=sys.argv[3], fps=25.0, max_side=512,
                  annotators=nodes, progress=False)
wall = time.perf_counter()
stats = run_shard(cfg)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024, "clips": stats["clips"]}))
"""


def shard_in_child(source: Path, work: Path) -> dict:
    inputs = work / "in"
    inputs.mkdir(parents=True)
    (inputs / source.name).symlink_to(source)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(inputs), str(work / "out"), json.dumps(LIGHT)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from data_pipelines.damaged_media import make_long_source

    minutes = [float(m) for m in sys.argv[1:]] or [1.0, 4.0, 16.0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for length in minutes:
            folder = Path(tmp) / f"src_{length:g}"
            folder.mkdir()
            long = make_long_source(folder, length, width=640, height=360, fps=25)
            print(f"wrote a {length:g} min source in {long.write_seconds:.1f} s", flush=True)
            run = shard_in_child(long.case.path, Path(tmp) / f"run_{length:g}")
            seconds = length * 60
            rows[length] = run
            print(
                f"{length:5g} min: peak RSS {run['peak_rss_mb']:7.1f} MB | {run['clips']:4d} clips "
                f"in {run['wall']:6.1f} s wall, {run['cpu']:6.1f} s CPU | "
                f"{run['clips'] / run['cpu']:5.2f} clips/CPU-s | "
                f"{seconds / run['cpu']:5.1f}x real time per core",
                flush=True,
            )
    if len(rows) > 1:
        shortest, longest = min(rows), max(rows)
        ratio = rows[longest]["peak_rss_mb"] / rows[shortest]["peak_rss_mb"]
        print(
            f"peak RSS {longest:g} min / {shortest:g} min = {ratio:.3f} "
            f"(flat within 10 %: {'yes' if ratio <= 1.10 else 'NO'})"
        )


if __name__ == "__main__":
    main()
