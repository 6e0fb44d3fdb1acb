"""The W&B service dies of SIGTERM (as under a step-wide slurm signal): logging goes on in the
same run id, nothing raises into the caller, and every row reaches some offline segment."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" magic, 2-byte version, 1-byte flag


def history_steps(path: Path) -> list[int]:
    """The history steps in a .wandb transaction log (leveldb log format of Record protos)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    steps, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:
            offset += left_in_block  # block trailer padding
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break  # zero-filled tail
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return steps


def _service_pids() -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "wandb-core"], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # nobody reaps the dead service until the next init


def test_a_killed_service_is_replaced_and_no_row_is_lost(tmp_path, monkeypatch, caplog):
    from omni_train.trainer.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    sink = WandbSink(dict(project="t", id="sinktest0001", dir=str(tmp_path), mode="offline"))
    for step in range(10):
        sink.log({"loss": float(step)}, step)
    pids = _service_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pids[0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for step in range(10, 15):
        sink.log({"loss": float(step)}, step)  # the first of these finds the service gone
    sink.finish()
    assert sink.reconnects == 1
    assert "W&B service lost" in caplog.text
    segments = sorted((tmp_path / "wandb").glob("offline-run-*-sinktest0001/*.wandb"))
    assert len(segments) == 2, segments
    logged = [history_steps(s) for s in segments]
    # The replacement resumed the same run id and holds every row after the kill; rows the
    # dead service had not written are replayed there too.
    assert logged[1] == sorted(logged[1]) and set(range(10, 15)) <= set(logged[1])
    assert set(logged[0]) | set(logged[1]) == set(range(15))


def test_a_service_that_cannot_come_back_switches_wandb_off_not_the_run(tmp_path, monkeypatch):
    from omni_train.trainer import wandb_sink

    class DeadRun:
        dir = str(tmp_path / "files")

        def log(self, *args, **kwargs):
            raise ConnectionResetError("Connection lost")

        def finish(self, *args, **kwargs):
            raise ConnectionResetError("Connection lost")

    inits = []

    def init(**kwargs):
        inits.append(kwargs)
        return DeadRun()

    import wandb

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "teardown", lambda *a, **k: None)
    sink = wandb_sink.WandbSink(dict(project="t", id="x"))
    for step in range(10):
        sink.log({"loss": 1.0}, step)
    sink.finish()
    assert sink.run is None
    # The first init plus MAX_RECONNECTS attempts, each resuming the same run id.
    assert len(inits) == 1 + wandb_sink.MAX_RECONNECTS
    assert all(k["id"] == "x" and k["resume"] == "allow" for k in inits)
