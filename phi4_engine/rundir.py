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

from phi4_engine import ranks
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
    was on disk when it was opened.

    ``write=False`` (the other ranks of a --nproc run, where rank 0 is the one writer): the
    records are read, a torn line is ignored rather than cut, and appends are dropped."""

    def __init__(self, path: str | os.PathLike[str], *, write: bool = True) -> None:
        self.path = Path(path)
        self.records: list[Any] = []
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data) and write:
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
                    os.fsync(f.fileno())
            for lineno, line in enumerate(whole.splitlines(), 1):
                try:
                    self.records.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise DataError(f"{self.path}:{lineno}: not a JSON record ({exc})") from None
        self._file = open(self.path, "ab") if write else None

    def append(self, record: Any) -> None:
        self.extend([record])

    def extend(self, records: list[Any]) -> None:
        """Append several records with one fsync (callers serialize concurrent appends)."""
        if self._file is None:
            return
        self._file.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Fields that define what a run *is*: changing them under an existing run dir is refused. So is
# any change to a stage that has started (its data, budget, optimizer…), except the ones below.
IDENTITY_FIELDS = ("seed", "model", "tokenizer")
# Fields of a started stage that may change at resume: they do not change what it trains on or
# how (a flaky judge API may need a longer timeout or fewer parallel requests to finish).
SAFE_STAGE_FIELDS = ("evaluations", "judge.timeout_s", "judge.concurrency", "judge.max_retries")


def json_diff(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, old, new)`` for every leaf that differs between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in json_diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]  # fmt: skip
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in json_diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def _show(path: str, old: Any, new: Any) -> str:
    return f"{path}: {orjson.dumps(old).decode()} -> {orjson.dumps(new).decode()}"


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
        if not ranks.is_main():
            return  # under torchrun rank 0 keeps the books
        atomic_write(self.ledger_path, orjson.dumps(ledger, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))

    def check_resume(self, spec: dict[str, Any], origin: str, started: set[str]) -> list[str]:
        """Compare ``spec`` with the one this run dir was made by. Identity changes (seed, model,
        tokenizer, the stages' names and kinds, anything of a ``started`` stage but its
        evaluations) raise SpecError with the diff; the other changes are returned, one line
        each, for the caller to record."""
        previous_path = self.path / "spec.json"
        if not previous_path.exists():
            return []
        previous = orjson.loads(previous_path.read_bytes())
        old_kinds = [(s.get("name"), s.get("kind")) for s in previous.get("stages", [])]
        new_kinds = [(s.get("name"), s.get("kind")) for s in spec.get("stages", [])]
        identity: list[str] = [] if old_kinds == new_kinds else [f"stages: {old_kinds} -> {new_kinds}"]
        safe: list[str] = []
        names = {f"stages[{i}]": name for i, (name, _) in enumerate(new_kinds)}
        for path, old, new in json_diff(previous, spec):
            head = path.split(".", 1)[0]
            if head.startswith("stages") and old_kinds != new_kinds:
                continue  # already reported as a whole
            index = head.split("]")[0] + "]" if head.startswith("stages[") else None
            stage = names.get(index or "")
            shown = _show(path.replace(index, f"stages.{stage}", 1) if stage else path, old, new)
            if head in IDENTITY_FIELDS:
                identity.append(shown)
            elif stage in started and not path.split(".", 1)[-1].startswith(SAFE_STAGE_FIELDS):
                identity.append(shown)
            else:
                safe.append(shown)
        if identity:
            raise SpecError(
                f"{origin}: run dir {self.path} was made by a different spec; identity fields changed: "
                + "; ".join(identity)
                + " (use a new --run-dir, or delete the stage folders to redo)"
            )
        return safe

    def write_spec(self, spec: dict[str, Any], canonical: bytes, sha256: str) -> None:
        if not ranks.is_main():
            return
        atomic_write(self.path / "spec.json", canonical)
        atomic_write(self.path / "spec.json.sha256", f"{sha256}  spec.json\n".encode())


def now() -> float:
    return round(time.time(), 3)
