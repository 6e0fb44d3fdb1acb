"""Preemption: a signal sets a flag; the loop checks it between steps, saves and exits.

The handler only records the signal (saving inside a handler could interrupt a collective
half-way). Ranks agree through one all-reduce per step, so a signal that reached only some
ranks (or reached them a step apart) still stops every rank after the same step.

A Python handler that was installed before the flag (submitit installs one for SIGUSR2 that
requeues the slurm job) is deferred, not dropped: `restore` calls it once the loop has ended,
i.e. after the preemption checkpoint is written, so the job is requeued with a checkpoint to
resume from. Default and ignore dispositions are only put back.

Slurm signals every process of a job step, not only the trainer: helper processes the trainer
owns (loader workers, conversion subprocesses) ignore them (omni_train/stop_signals.py)
and are ended by the trainer on purpose. The flag is installed before the process group and
the engine are built, so a signal during start-up is not fatal either.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

# Written into the run dir after a preemption checkpoint; a launcher requeues on it.
PREEMPTED_MARKER = "preempted.json"

Handler = Callable[[int, FrameType | None], object]


class PreemptionError(SystemExit):
    """Raised after the preemption checkpoint is written; its code is the requeue code."""


def _is_deferrable(handler: object) -> bool:
    # SIG_DFL/SIG_IGN (and None for handlers set outside Python) are dispositions, not code to
    # run; Python's own SIGINT handler would only turn the clean exit into a KeyboardInterrupt.
    return callable(handler) and handler is not signal.default_int_handler


class SignalFlag:
    def __init__(self, names: list[str]) -> None:
        self.received: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[signal.Signals, object] = {}
        for name in names:
            try:
                sig = signal.Signals[name]
            except KeyError:
                raise ValueError(
                    f"trainer.preemption.signals: unknown signal {name!r} "
                    "(e.g. SIGTERM, SIGUSR1, SIGUSR2)"
                ) from None
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.monotonic()
            log.warning("received %s: saving after the current step, then exiting", self.received)

    @property
    def raised(self) -> bool:
        return self.received is not None

    @contextmanager
    def restored_on_error(self) -> Iterator[None]:
        """Put the previous handlers back if the block raises (a run that never starts)."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    def seconds_since(self) -> float | None:
        """Seconds since the first signal arrived (None without one)."""
        return None if self.received_at is None else time.monotonic() - self.received_at

    def deferred_handler(self) -> Handler | None:
        """The handler that owned the received signal before the flag, if it is Python code."""
        if self.received is None:
            return None
        previous = self._previous.get(signal.Signals[self.received])
        return previous if _is_deferrable(previous) else None  # type: ignore[return-value]

    def restore(self) -> None:
        """Put the previous handlers back, then run the one the received signal was meant for.

        The deferred handler may raise or exit (submitit's requeues the job and exits on
        rank 0); that replaces the PreemptionError, the checkpoint being already written.
        """
        deferred = self.deferred_handler()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if deferred is not None:
            log.warning("passing %s on to the handler installed before training", self.received)
            deferred(signal.Signals[self.received].value, None)  # type: ignore[index]
