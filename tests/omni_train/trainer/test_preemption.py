from __future__ import annotations

import os
import signal

import pytest

from omni_train.trainer.preemption import SignalFlag


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_configured_signal_is_recorded_not_fatal(name):
    flag = SignalFlag(["SIGTERM", "SIGUSR1"])
    try:
        assert not flag.raised
        os.kill(os.getpid(), getattr(signal, name))
        assert flag.raised and flag.received == name
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_unknown_signal_name_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.preemption.signals.*SIGTREM"):
        SignalFlag(["SIGTREM"])


def test_progress_line_and_mfu_figures():
    from omni_train.trainer.progress import format_duration, progress_line
    from omni_train.trainer.throughput import detect_peak_tflops, mfu

    row = {"step": 5, "stage": 2, "loss": 0.5, "lr": 1e-4, "samples_per_s": 3.0, "mfu": 0.41}
    line = progress_line(row, 10, 75.0, width=10)
    assert line.startswith("[#####-----] 5/10") and "mfu 41.0%" in line and "eta 1:15" in line
    assert format_duration(3725) == "1:02:05"
    assert detect_peak_tflops(2.5) == 2.5
    assert mfu(1e12, 2.0, 4, 1.0) == pytest.approx(0.5)
