"""The run directory: resolved spec, an atomically written ledger, and one folder per stage.

The ledger is the single source of truth for what finished: a stage is done only once its entry
says so, written with write-to-temp + fsync + rename, so a crash never leaves a half ledger.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from phi4_engine.errors import DataError, SpecError


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AppendLog:
    """A JSONL file that survives crashes: each record is one flushed + fsync'd line, and a line
    torn by a crash mid-append is cut off when the file is opened again. ``records`` holds what
    was on disk when it was opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[Any] = []
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
                    os.fsync(f.fileno())
            for lineno, line in enumerate(whole.splitlines(), 1):
                try:
                    self.records.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise DataError(f"{self.path}:{lineno}: not a JSON record ({exc})") from None
        self._file = open(self.path, "ab")

    def append(self, record: Any) -> None:
        self.extend([record])

    def extend(self, records: list[Any]) -> None:
        """Append several records with one fsync (callers serialize concurrent appends)."""
        self._file.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Fields that define what a run *is*: changing them under an existing run dir is refused.
IDENTITY_FIELDS = ("seed", "model", "tokenizer")


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Absolute: checkpoint paths recorded in the ledger are handed to torchtitan (which
        # requires absolute paths) and must not depend on the working directory of a later run.
        self.path = Path(path).absolute()
        self.ledger_path = self.path / "ledger.json"

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def read_ledger(self) -> dict[str, Any]:
        if not self.ledger_path.exists():
            return {"stages": {}}
        return orjson.loads(self.ledger_path.read_bytes())

    def write_ledger(self, ledger: dict[str, Any]) -> None:
        atomic_write(self.ledger_path, orjson.dumps(ledger, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))

    def check_identity(self, spec: dict[str, Any], origin: str) -> None:
        """Refuse to continue a run whose identity fields changed (the diff is in the message)."""
        previous_path = self.path / "spec.json"
        if not previous_path.exists():
            return
        previous = orjson.loads(previous_path.read_bytes())
        diffs = [
            f"{key}: {orjson.dumps(previous.get(key)).decode()} -> {orjson.dumps(spec.get(key)).decode()}"
            for key in IDENTITY_FIELDS
            if previous.get(key) != spec.get(key)
        ]
        old_kinds = [(s.get("name"), s.get("kind")) for s in previous.get("stages", [])]
        new_kinds = [(s.get("name"), s.get("kind")) for s in spec.get("stages", [])]
        if old_kinds != new_kinds:
            diffs.append(f"stages: {old_kinds} -> {new_kinds}")
        if diffs:
            raise SpecError(
                f"{origin}: run dir {self.path} was made by a different spec; identity fields changed: "
                + "; ".join(diffs)
                + " (use a new --run-dir)"
            )

    def write_spec(self, spec: dict[str, Any], canonical: bytes, sha256: str) -> None:
        atomic_write(self.path / "spec.json", canonical)
        atomic_write(self.path / "spec.json.sha256", f"{sha256}  spec.json\n".encode())


def now() -> float:
    return round(time.time(), 3)
