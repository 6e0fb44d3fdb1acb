"""A torch.profiler window over a few steps, configured by trainer.profiler."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from omni_train.trainer.config import ProfilerConfig

log = logging.getLogger(__name__)


class StepProfiler:
    """Profiles steps [start_step, start_step + num_steps) (0-based step indices) and writes
    one Chrome trace per rank to ``out_dir/trace_rank{R}_steps{A}-{B}.json``."""

    def __init__(self, cfg: ProfilerConfig, out_dir: Path, rank: int) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.rank = rank
        self._profile: torch.profiler.profile | None = None
        self._done = cfg.num_steps <= 0

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(
            activities=activities,
            record_shapes=True,
            profile_memory=self.cfg.with_memory,
            with_stack=False,
        )
        self._profile.__enter__()

    def _finish(self) -> None:
        assert self._profile is not None
        self._profile.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        first, last = self.cfg.start_step, self.cfg.start_step + self.cfg.num_steps - 1
        path = self.out_dir / f"trace_rank{self.rank}_steps{first}-{last}.json"
        self._profile.export_chrome_trace(str(path))
        log.info("profiler trace of steps %d-%d written to %s", first, last, path)
        self._profile = None
        self._done = True

    @contextlib.contextmanager
    def step(self, step_index: int) -> Iterator[None]:
        end = self.cfg.start_step + self.cfg.num_steps
        if not self._done and self._profile is None and step_index >= self.cfg.start_step:
            if step_index < end:
                self._start()
            else:
                self._done = True  # resumed past the window
        with torch.profiler.record_function(f"train_step_{step_index}"):
            yield
        if self._profile is not None:
            self._profile.step()
            if step_index + 1 >= end:
                self._finish()

    def close(self) -> None:
        if self._profile is not None:
            self._finish()
