"""A one-line console progress bar for the main rank (log lines when not on a terminal)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


def progress_line(row: dict[str, Any], max_steps: int, eta_s: float, width: int = 24) -> str:
    step = row["step"]
    filled = min(width, int(width * step / max(max_steps, 1)))
    bar = "#" * filled + "-" * (width - filled)
    loss = row["loss"]
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
    parts = [
        f"[{bar}] {step}/{max_steps}",
        f"stage {row['stage']}",
        f"loss {loss_text}",
        f"lr {row['lr']:.2e}",
        f"{row['samples_per_s']:.1f} samples/s",
    ]
    if "mfu" in row:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class ProgressBar:
    def __init__(self, max_steps: int, start_step: int, stream: TextIO | None = None) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()

    def eta(self, step: int) -> float:
        done = max(step - self.start_step, 1)
        return (time.monotonic() - self._started) / done * (self.max_steps - step)

    def update(self, row: dict[str, Any]) -> None:
        if not self.interactive:
            return
        line = progress_line(row, self.max_steps, self.eta(row["step"]))
        self.stream.write("\r" + line[:200].ljust(120))
        if row["step"] >= self.max_steps:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
