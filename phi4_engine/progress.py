"""A progress bar for long non-training work (candidate generation, judging, rollouts).

Training steps have their own bar (the ``loggers`` plugin); this one is for the data phases of
the post-training stages. ``PHI4_ENGINE_PROGRESS=0`` (CI, tests) turns it off.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

from phi4_engine import ranks


def enabled() -> bool:
    """On unless ``PHI4_ENGINE_PROGRESS=0``; under --nproc, rank 0's bar only (its share)."""
    return os.environ.get("PHI4_ENGINE_PROGRESS", "1") != "0" and ranks.is_main()


class WorkProgress:
    """``with WorkProgress("dpo-judge: judging", total=n, unit="prompts") as bar: bar.advance(k, info)``."""

    def __init__(self, description: str, *, total: int | None, unit: str, completed: int = 0) -> None:
        self.bar = None
        if not enabled():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(file=sys.stderr),
        )  # fmt: skip
        self.task = self.bar.add_task(description, total=total, completed=completed, info="")

    def advance(self, amount: int = 1, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=amount, info=info)

    def __enter__(self) -> "WorkProgress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()
