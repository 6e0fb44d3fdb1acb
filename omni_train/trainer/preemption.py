"""Preemption: a signal sets a flag; the loop checks it between steps, saves and exits.

The handler only records the signal (saving inside a handler could interrupt a collective
half-way). Ranks agree through one all-reduce per step, so a signal that reached only some
ranks (or reached them a step apart) still stops every rank after the same step.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)


class PreemptionError(SystemExit):
    """Raised after the preemption checkpoint is written; its code is the requeue code."""


class SignalFlag:
    def __init__(self, names: list[str]) -> None:
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        for name in names:
            try:
                sig = signal.Signals[name]
            except KeyError:
                raise ValueError(
                    f"trainer.preemption.signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)"
                ) from None
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: saving after the current step, then exiting", self.received)

    @property
    def raised(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
