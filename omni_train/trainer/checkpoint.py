"""Atomic checkpoint folders.

Every rank writes into a hidden staging folder; once all ranks are done, rank 0 writes the
completion marker and renames the folder to its final name in one atomic step. A crash or
kill at any point before the rename leaves only a staging folder, which is never picked up
and is cleared on the next start; the previous complete checkpoint stays the newest.

Trust: a run directory is trusted input; resume only from run dirs you (or your team)
wrote. Its own files are JSON and safetensors, but DeepSpeed's engine and optimizer state are
torch pickles (``*.pt``) that DeepSpeed loads with ``weights_only=False``. Resume and the
universal conversion load them inside ``weights_only_loads()``, which forces torch's
weights-only unpickler: tensors, containers and the three plain DeepSpeed record classes of
``pickled_optimizer_classes()``, so a ``.pt`` file naming any other global fails to load with
an error naming it instead of running it. The ``_target_`` of a run's config.yaml is checked
before sampling it (omni_train/sample.py, ``trust_checkpoint_code``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omni_train.models.weights import fsync_directory
from omni_train.trainer.deepspeed_internals import pickled_optimizer_classes

COMPLETE_MARKER = "complete.json"
# Meta key of a checkpoint that prune() keeps whatever keep_last says.
PINNED = "pinned"
_FINAL = re.compile(r"^step_(\d{8,})$")
_STAGING_PREFIX = ".staging_"
# torch.load uses the weights-only unpickler whenever this is set, whatever the caller passes.
FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{_STAGING_PREFIX}{checkpoint_name(step)}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _FINAL.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    with open(checkpoint / COMPLETE_MARKER, encoding="utf-8") as f:
        return json.load(f)


def clear_staging(root: Path) -> list[Path]:
    """Remove staging folders left by a save that never finished."""
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_STAGING_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def publish(staging: Path, meta: dict[str, Any]) -> Path:
    """Mark a fully written staging folder complete and move it to its final name."""
    write_json_atomic(staging / COMPLETE_MARKER, meta)
    final = staging.with_name(staging.name[len(_STAGING_PREFIX) :])
    if final.exists():
        # Re-saving a step (e.g. after resuming from it): swap the old folder out first.
        old = final.with_name(f"{_STAGING_PREFIX}old_{final.name}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_directory(final.parent)
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps everything).

    Pinned checkpoints (meta ``"pinned": true``, e.g. trainer.save_at_start's step 0) are
    never deleted and do not count among the ``keep_last``.
    """
    if keep_last <= 0:
        return []
    prunable = [path for _, path in complete_checkpoints(root) if not read_meta(path).get(PINNED)]
    doomed = prunable[:-keep_last]
    for path in doomed:
        # Drop the marker first so a half-deleted folder can never be mistaken for complete.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside unpickles tensors, containers and pickled_optimizer_classes()
    only, even where DeepSpeed passes weights_only=False: any other global in a ``.pt`` file
    raises pickle.UnpicklingError naming it, and is never imported or called."""
    import torch

    previous = os.environ.get(FORCE_WEIGHTS_ONLY_ENV)
    os.environ[FORCE_WEIGHTS_ONLY_ENV] = "1"
    try:
        with torch.serialization.safe_globals(pickled_optimizer_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY_ENV, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY_ENV] = previous
