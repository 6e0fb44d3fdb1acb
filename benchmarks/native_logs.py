"""Drop MediaPipe's native log lines from a benchmark's stderr, keep everything else.

MediaPipe's C++ code logs through absl before anyone calls ``absl::InitializeLog``, so every
graph it builds writes ``W0000 ... inference_feedback_manager.cc:114] ...`` (and TFLite an
``INFO: Created TensorFlow Lite XNNPACK delegate`` line) straight to file descriptor 2. No
environment variable reaches that logger (GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL and
ABSL_MIN_LOG_LEVEL were tried) and the bindings export no function to set its level, so the
descriptor itself is filtered: fd 2 becomes a pipe whose reader forwards every line except
absl INFO/WARNING lines and TFLite's INFO lines. Python's own ``sys.stderr`` (tracebacks,
logging) keeps writing to the real stderr directly.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# absl's prefix: severity letter, MMDD, time (before InitializeLog, hours and minutes are 0
# and the seconds run from the epoch), thread id, file:line]. E and F lines are kept.
NATIVE_NOISE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    rb"|INFO: Created TensorFlow Lite"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)


def drop_native_log_noise(noise: re.Pattern[bytes] = NATIVE_NOISE) -> None:
    """From now on, lines written to fd 2 that match ``noise`` are dropped."""
    sys.stdout.flush()
    sys.stderr.flush()
    real = os.dup(2)
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not noise.match(line):
                    os.write(real, line)

    reader = threading.Thread(target=forward, name="native-stderr-filter", daemon=True)
    reader.start()

    def restore() -> None:
        os.dup2(real, 2)  # closes the pipe's last write end: the reader drains it and stops
        reader.join(timeout=5)

    atexit.register(restore)
