"""The signals that announce the end of a job, and how helper processes outlive them.

Slurm delivers SIGTERM (preemption, time limit, `scancel --signal=TERM`), SIGUSR1
(`--signal=USR1@T` before the time limit) and SIGUSR2 (submitit) to every process of a job
step. The trainer handles them (omni_train/trainer/preemption.py); a helper it owns must not
die of them before the trainer has saved and ended it on purpose.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(*_: object) -> None:
    """Make this (helper) process ignore the stop signals.

    Usable as a DataLoader ``worker_init_fn`` or a subprocess ``preexec_fn``: an ignored
    disposition survives fork and exec. The owner ends the helper on purpose after saving;
    a helper whose owner died exits on its own (loader workers watch their parent).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
