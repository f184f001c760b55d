"""Bookkeeping for the opt-in ``skip`` bad-input policy: counts, a quarantine file, a limit.

Why a separate object: the policy is the same for every reader of records (``jsonl`` today,
others later), and its promises are easy to get subtly wrong inline — every record read is
either kept or skipped (``read == kept + skipped``), every skipped record is written down with
enough context to fix it (``{"file", "line", "error", "raw"}``), and a file that is mostly
garbage stops the run instead of silently shrinking the corpus (``max_fraction``).

The limit is checked on every record once ``min_records`` were read (so a broken file fails
fast, before a whole epoch of it trains), and once more at the end of the input (so a short
file with one bad line in three fails too).

Multi-process runs: every data-parallel rank reads the same records, so only rank 0 (the
``RANK`` environment variable torchrun sets; unset means a single process) writes the file;
the other ranks count the same records in memory. A reader rewrites the file from scratch,
since a fresh reader always re-reads from the first record (see ``plugins/jsonl.py``).
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from phi4_engine.errors import DataError


def _is_writer() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Quarantine:
    """Counts records of one input and keeps the bad ones (in a JSONL file, or in memory)."""

    def __init__(self, source: str, path: str | None, max_fraction: float, *, min_records: int = 100) -> None:
        self.source = source
        """The input's path (named in the error when the limit is exceeded)."""
        self.path = path
        """Quarantine file, or None to keep the records in :attr:`records`."""
        self.max_fraction = max_fraction
        self.min_records = min_records
        self.read = 0
        self.kept = 0
        self.skipped = 0
        self.records: list[dict[str, Any]] = []
        """Quarantined records when there is no file (empty otherwise)."""
        self.error: DataError | None = None
        """Set once the limit was exceeded; the reader re-raises it on every later read."""
        self._first: str | None = None
        self._writes = path is not None and _is_writer()
        if self._writes and os.path.exists(path):  # type: ignore[arg-type]
            os.unlink(path)  # type: ignore[arg-type]  # a stale file from an earlier reader

    def keep(self) -> None:
        self.read += 1
        self.kept += 1
        if self.read == self.min_records:
            self._check()

    def skip(self, file: str, line: int, error: str, raw: bytes) -> None:
        """Count and record one bad record; raises :class:`DataError` past the limit."""
        self.read += 1
        self.skipped += 1
        if self._first is None:
            self._first = f"line {line}: {error}"
        record = {"file": file, "line": line, "error": error, "raw": raw.decode("utf-8", errors="replace")}
        if self.path is None:
            self.records.append(record)
        elif self._writes:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "ab") as fh:  # one write per record: bad records are rare
                fh.write(orjson.dumps(record) + b"\n")
        if self.read >= self.min_records:
            self._check()

    def finish(self) -> None:
        """End of the input: the limit applies whatever the number of records."""
        if self.read:
            self._check()

    def _check(self) -> None:
        if self.skipped > self.max_fraction * self.read:
            where = self.path or "kept in memory"
            self.error = DataError(
                f"{self.source}: {self.skipped} bad records of {self.read} read "
                f"({self.skipped / self.read:.2%}) exceed max_skip_fraction {self.max_fraction:g} "
                f"(kept {self.kept}; first bad {self._first}; quarantine: {where})"
            )
            raise self.error

    def report(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "quarantine_file": self.path if self.skipped else None,
            "quarantined": list(self.records),
        }
