"""Resume on a different world size through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint stores optimizer state partitioned for the world size that wrote it, so
plain loading refuses another size. ``ds_to_universal`` rewrites it as one file per
parameter (weights and optimizer moments), which any world size and ZeRO stage can load.
The conversion runs once, on the main rank, into ``run_dir/universal/step_N`` (written to a
staging name and renamed, so a kill during conversion leaves nothing that looks finished).
It runs ds_to_universal in a subprocess through this module's ``__main__``, whose torch.loads
are weights-only (omni_train.trainer.checkpoint.weights_only_loads): DeepSpeed's loaders would
unpickle anything in the checkpoint's ``.pt`` files.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omni_train.stop_signals import ignore_stop_signals

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
_DONE = "converted.ok"


def universal_root(run_dir: Path) -> Path:
    return run_dir / UNIVERSAL_DIR


def convert_to_universal(checkpoint: Path, run_dir: Path, timeout_s: float = 3600) -> Path:
    """Convert ``checkpoint`` once; returns ``run_dir/universal/<checkpoint name>``."""
    out = universal_root(run_dir) / checkpoint.name
    if (out / _DONE).is_file():
        return out
    staging = out.with_name(f".staging_{checkpoint.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "omni_train.trainer.universal",
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(staging),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # The conversion is a helper of the resuming trainer: a stop signal must not kill it.
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        preexec_fn=ignore_stop_signals,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"converting {checkpoint} to a universal checkpoint failed (exit {proc.returncode}):"
            f"\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}\nresume with the world size it was "
            "saved with, or start a new run_dir"
        )
    (staging / _DONE).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log.info(
        "converted %s to a universal checkpoint in %.1f s", checkpoint, time.monotonic() - started
    )
    return out


def clear_universal(run_dir: Path) -> None:
    """Drop converted copies: once the resized run has saved, its own checkpoints rule."""
    shutil.rmtree(universal_root(run_dir), ignore_errors=True)


def convert_weights_only(argv: list[str]) -> None:
    """ds_to_universal's command line (``argv``), every torch.load in it weights-only."""
    from deepspeed.checkpoint import ds_to_universal

    from omni_train.trainer.checkpoint import weights_only_loads

    sys.argv = ["ds_to_universal", *argv]
    with weights_only_loads():
        ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    convert_weights_only(sys.argv[1:])
