"""Built-in observers: TensorBoard events, metrics.jsonl and a progress bar, per stage.

They only listen to lifecycle hooks. On resume from step k they drop what was logged after k
(TensorBoard ``purge_step``, JSONL truncation), so a step never appears twice.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pathlib import Path

import orjson

from phi4_engine import hookimpl
from phi4_engine.rundir import atomic_write

_settings: dict[str, dict[str, Any]] = {}  # run_dir -> spec["logging"]
_open: dict[str, "_StageLoggers"] = {}  # stage_dir -> loggers


class _StageLoggers:
    def __init__(self, stage: str, stage_dir: str, settings: dict[str, Any], total: int, start: int) -> None:
        self.tb = None
        self.jsonl = None
        self.progress = None
        if settings.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = os.path.join(stage_dir, "tb")
            # A stage restarting from step 0 (stopped before its first checkpoint) purges too:
            # its earlier attempt's steps are in the event files already.
            earlier = start > 0 or (os.path.isdir(tb_dir) and bool(os.listdir(tb_dir)))
            self.tb = SummaryWriter(tb_dir, purge_step=start + 1 if earlier else None)
        if settings.get("jsonl", True):
            path = os.path.join(stage_dir, "metrics.jsonl")
            _truncate_after(path, start)
            self.jsonl = open(path, "ab")
        if settings.get("progress", True) and os.environ.get("PHI4_ENGINE_PROGRESS", "1") != "0":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self.task = self.progress.add_task(stage, total=total, completed=start, info="")
            self.progress.start()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):  # not ``batch`` (a digest string)
                    self.tb.add_scalar(key, value, step)
        if self.jsonl is not None:
            self.jsonl.write(orjson.dumps({"step": step, **metrics}) + b"\n")
            self.jsonl.flush()
        if self.progress is not None:
            info = f"loss {metrics.get('loss', float('nan')):.4f}"
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.progress is not None:
            self.progress.stop()


def _truncate_after(path: str, step: int) -> None:
    """Keep only lines with step <= ``step`` (those after it were lost with the last run).
    Rewritten atomically: a crash here must not lose the lines that are kept."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        # A line torn by a kill mid-write is not JSON: it is dropped with the steps after ``step``.
        lines = [line for line in f if line.strip() and _step_of(line) <= step]
    atomic_write(Path(path), b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))


def _step_of(line: bytes) -> float:
    try:
        return orjson.loads(line).get("step", 0)
    except orjson.JSONDecodeError:
        return float("inf")


@hookimpl
def phi4_run_start(run_dir: str, spec: dict[str, Any]) -> None:
    _settings[run_dir] = dict(spec.get("logging", {}))


@hookimpl
def phi4_stage_start(run_dir: str, stage: str, kind: str, stage_dir: str, total_steps: int, start_step: int) -> None:
    previous = _open.pop(stage_dir, None)
    if previous is not None:
        previous.close()
    _open[stage_dir] = _StageLoggers(stage, stage_dir, _settings.get(run_dir, {}), total_steps, start_step)


@hookimpl
def phi4_step_end(stage: str, stage_dir: str, step: int, metrics: dict[str, float]) -> None:
    loggers = _open.get(stage_dir)
    if loggers is not None:
        loggers.step(step, metrics)


@hookimpl
def phi4_stage_end(run_dir: str, stage: str, stage_dir: str, summary: dict[str, Any]) -> None:
    loggers = _open.pop(stage_dir, None)
    if loggers is not None:
        loggers.close()


@hookimpl
def phi4_run_error(run_dir: str, stage: str | None, error: BaseException) -> None:
    for stage_dir in [d for d in _open if d.startswith(run_dir)]:
        _open.pop(stage_dir).close()
