"""A plugin that timestamps every optimizer step's end (shared by the step-time benchmarks)."""

from __future__ import annotations

import time

import torch

from phi4_engine import hookimpl


class StepClock:
    __name__ = "bench-clock"

    def __init__(self) -> None:
        self.times: list[float] = []

    @hookimpl
    def phi4_step_end(self, stage, stage_dir, step, metrics):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time it finished, not queued
        self.times.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        """Seconds between consecutive step ends, after the first ``skip``."""
        return [b - a for a, b in zip(self.times, self.times[1:])][skip:]
