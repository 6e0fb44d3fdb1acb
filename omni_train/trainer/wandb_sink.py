"""The run's W&B run, kept going when W&B's service process dies under it.

Every `wandb.init` starts a service process (wandb-core) that exits on SIGTERM and SIGINT
whatever disposition it inherits: it installs its own handler (wandb/wandb#9963). Slurm
sends SIGTERM to every process of a job step on preemption, at the time limit and on
`scancel --signal=TERM`, so the service dies while the trainer is still saving. Neither
ignoring the signal nor a session of its own protects it.

So a failed W&B call never reaches the training loop. It reconnects instead: the dead
connection is torn down, a new service resumes the same run id, and the rows logged shortly
before (which the dead service may not have written: it buffers its transaction log) are
logged again, from the first step the resumed run has not seen. metrics.jsonl in the run dir
stays the complete record whatever W&B does; after max_reconnects failures W&B is switched
off for the rest of the run with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Rows kept for a replay: far more than the service's unwritten tail (one 32 KiB block of
# its transaction log, plus what it had not uploaded yet).
REPLAY_ROWS = 512
MAX_RECONNECTS = 3


class WandbSink:
    def __init__(self, init_kwargs: dict[str, Any], replay_rows: int = REPLAY_ROWS) -> None:
        self._init_kwargs = {**init_kwargs, "resume": "allow"}
        self._recent: deque[tuple[dict[str, Any], int]] = deque(maxlen=replay_rows)
        self.reconnects = 0
        self.run: Any = self._init()
        self.dir = Path(self.run.dir).parent

    def _init(self) -> Any:
        import wandb

        # An offline run's directory is named after the second it starts in: a second init
        # of the same run id within that second would overwrite the first one's file.
        if int(time.time()) == getattr(self, "_started_second", None):
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
        self._started_second = int(time.time())
        return wandb.init(**self._init_kwargs)

    def log(self, values: dict[str, Any], step: int) -> None:
        self._recent.append((values, step))
        # After a reconnect the replay has logged this row already.
        self._call(lambda run: run.log(values, step=step), again_after_reconnect=False)

    def finish(self, exit_code: int | None = None) -> None:
        self._call(lambda run: run.finish(exit_code=exit_code))
        self.run = None

    def _call(self, action: Callable[[Any], object], again_after_reconnect: bool = True) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
            return
        except Exception as err:  # wandb raises connection and internal errors alike
            if not self._reconnect(err) or not again_after_reconnect:
                return
        try:
            action(self.run)
        except Exception as err:
            self._switch_off(f"{type(err).__name__}: {err} (right after reconnecting)")

    def _reconnect(self, err: Exception) -> bool:
        import wandb

        log.warning(
            "W&B service lost (%s: %s): starting a new one for run %s and logging the last "
            "rows again; metrics.jsonl has every row either way",
            type(err).__name__,
            err,
            self._init_kwargs.get("id"),
        )
        while self.reconnects < MAX_RECONNECTS:
            self.reconnects += 1
            try:
                wandb.teardown()
            except Exception:  # the dead connection fails its own teardown; it is reset anyway
                pass
            os.environ.pop("WANDB_SERVICE", None)  # else the new init dials the dead service
            try:
                self.run = self._init()
                # An online run resumes at the server's next step; earlier rows arrived.
                first_unseen = int(getattr(self.run, "step", 0) or 0)
                for values, step in list(self._recent):
                    if step >= first_unseen:
                        self.run.log(values, step=step)
                return True
            except Exception as retry_err:
                err = retry_err
        self._switch_off(f"{type(err).__name__}: {err} ({self.reconnects} reconnects)")
        return False

    def _switch_off(self, reason: str) -> None:
        log.warning("W&B switched off for the rest of this run: %s", reason)
        self.run = None
