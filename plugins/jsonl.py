"""Built-in data source ``jsonl``: one JSON object per line, plain or zstandard-compressed.

Strict by default: a malformed line, a missing or mistyped field, invalid UTF-8, an empty line
or a truncated ``.zst`` stream raises :class:`~phi4_engine.errors.DataError` naming
``file:line``. A truncated ``.zst`` is detected by checking that every zstd frame reached its
end (streaming readers otherwise return the partial data silently, FACTS.md §7.6).

``on_error: "skip"`` opts into skipping bad *records*: each is written to a quarantine file
(:mod:`phi4_engine.data.quarantine`) and counted, up to ``max_skip_fraction``. Damage to the
*file* (truncated or corrupt ``.zst``, unreadable file) stays an error: a short file must never
pass for a complete one. Positions then count kept records (``documents(start)`` skips
``start`` good records), so a resume lands on the same record; a fresh reader re-reads from
the first line to find that position, which also rebuilds the counts deterministically.

Records are either text (``{"text": "..."}``, the field is configurable) or chat records
(``{"messages": [{"role": "user", "content": "..."}, ...]}``, with ``field: "messages"``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Literal

import orjson
import zstandard
from pydantic import Field, ValidationInfo, field_validator

from phi4_engine import hookimpl
from phi4_engine.data.quarantine import Quarantine
from phi4_engine.data.source import DataSourceSpec, Document, SourceContext
from phi4_engine.errors import DataError
from phi4_engine.spec.base import resolve_path

_CHUNK = 1 << 20


class JsonlSourceSpec(DataSourceSpec):
    """A ``.jsonl`` or ``.jsonl.zst`` file of records, read in file order."""

    kind: Literal["jsonl"]
    """Source kind."""
    path: str
    """File to read (``.jsonl`` or ``.jsonl.zst``); relative paths resolve against the spec's directory."""
    field: str = "text"
    """Record field holding the document: a string (text), or a list of ``{role, content}`` messages (chat)."""
    id_field: str | None = None
    """Record field holding a stable document id; default ``<file name>:<line>``."""
    on_error: Literal["strict", "skip"] = "strict"
    """Bad record (malformed JSON, missing/mistyped field, invalid UTF-8, empty line): ``strict``
    stops with an error naming file:line; ``skip`` quarantines it (``<stage>/data/quarantine/``)
    and goes on. A truncated or corrupt ``.zst`` is an error under both."""
    max_skip_fraction: float = Field(0.01, ge=0, le=1)
    """With ``skip``: the largest tolerated share of bad records among those read, checked on
    every record once 100 were read and at the end of the file; more is an error."""

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class _RecordError(DataError):
    """A bad record (as opposed to a damaged file): the only kind ``skip`` may skip."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class JsonlSource:
    """A JSONL file as a :class:`~phi4_engine.data.DataSource`.

    Strict: record ``i`` is line ``i + 1``. Skip: record ``i`` is the ``i``-th good line.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        field: str = "text",
        id_field: str | None = None,
        on_error: Literal["strict", "skip"] = "strict",
        max_skip_fraction: float = 0.01,
        quarantine_path: str | None = None,
    ):
        if on_error not in ("strict", "skip"):
            raise ValueError(f"on_error must be 'strict' or 'skip', got {on_error!r}")
        self.path = path
        self.name = name or os.path.basename(path)
        self.field = field
        self.id_field = id_field
        self.on_error = on_error
        self._file_name = os.path.basename(path)
        self._len: int | None = None
        self._scanned = 0  # lines counted so far (from line 1, without gaps)
        self._bad: list[int] = []  # bad line numbers among them, ascending (skip mode)
        self._complete = False  # the whole file was counted
        self._quarantine = Quarantine(path, quarantine_path, max_skip_fraction) if on_error == "skip" else None

    # -- reading ------------------------------------------------------------------------------

    def _chunks(self) -> Iterator[bytes]:
        """Decompressed bytes of the file, in chunks; raises on a truncated ``.zst``."""
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        with fh:
            if not self.path.endswith(".zst"):
                while chunk := fh.read(_CHUNK):
                    yield chunk
                return
            dctx = zstandard.ZstdDecompressor()
            dobj = dctx.decompressobj()
            frame_started = False
            frames = 0
            while raw := fh.read(_CHUNK):
                while raw:
                    frame_started = True
                    try:
                        out = dobj.decompress(raw)
                    except zstandard.ZstdError as exc:
                        raise DataError(f"{self.path}: corrupt zstd data: {exc}") from None
                    if out:
                        yield out
                    if dobj.eof:  # a frame ended; further frames may follow in unused_data
                        frames += 1
                        raw = dobj.unused_data
                        dobj = dctx.decompressobj()
                        frame_started = False
                    else:
                        raw = b""
            if frame_started or frames == 0:
                what = "empty file" if frames == 0 and not frame_started else "stream ends mid-frame"
                raise DataError(f"{self.path}: truncated zstd stream ({what})")

    def _lines(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """``(line number, raw line)`` from line ``start + 1``; a last line without ``\\n`` counts."""
        lineno = 0
        rest = b""
        for chunk in self._chunks():
            if rest:
                chunk = rest + chunk
            lines = chunk.split(b"\n")
            rest = lines.pop()
            if lineno + len(lines) <= start:
                lineno += len(lines)
                continue
            for line in lines:
                lineno += 1
                if lineno > start:
                    yield lineno, line
        if rest:
            lineno += 1
            if lineno > start:
                yield lineno, rest

    def documents(self, start: int = 0) -> Iterator[Document]:
        if self._quarantine is not None:
            yield from self._skipping(start)
            return
        for lineno, line in self._lines(start):
            doc = self._parse(lineno, line)
            if lineno > self._scanned:
                self._scanned = lineno
            yield doc
        self._complete = True

    def _skipping(self, start: int) -> Iterator[Document]:
        """Good records from the ``start``-th on; each line is counted (and quarantined) once."""
        q = self._quarantine
        assert q is not None
        if q.error is not None:
            raise q.error
        skip_lines, kept = self._locate(start)
        for lineno, line in self._lines(skip_lines):
            new = lineno > self._scanned
            try:
                doc = self._parse(lineno, line)
            except _RecordError as exc:
                if new:
                    self._scanned = lineno
                    self._bad.append(lineno)
                    q.skip(self.path, lineno, exc.what, line)
                continue
            if new:
                self._scanned = lineno
                q.keep()
            if kept >= start:
                yield doc
            kept += 1
        if not self._complete:
            self._complete = True
            q.finish()

    def _locate(self, start: int) -> tuple[int, int]:
        """``(lines to pass over, index of the first good record after them)`` for ``start``.

        Inside the counted region the bad lines are known, so we jump straight to the line;
        beyond it we continue from the end of the region and count as we go.
        """
        known = self._scanned - len(self._bad)
        if start >= known:
            return self._scanned, known
        line = start + 1
        for bad in self._bad:
            if bad > line:
                break
            line += 1
        return line - 1, start

    def report(self) -> dict[str, Any]:
        """``{read, kept, skipped, quarantine_file, quarantined, complete}`` so far.

        ``quarantined`` holds the bad records when no quarantine file is written. Counts cover
        the lines read from the start of the file (``complete`` once it was read to the end).
        """
        if self._quarantine is not None:
            return {**self._quarantine.report(), "complete": self._complete}
        return {
            "read": self._scanned, "kept": self._scanned, "skipped": 0,
            "quarantine_file": None, "quarantined": [], "complete": self._complete,
        }

    def __len__(self) -> int:
        if self._quarantine is not None:  # records = good lines: read the whole file once
            if not self._complete:
                for _ in self._skipping(self._scanned - len(self._bad)):
                    pass
            return self._scanned - len(self._bad)
        if self._len is None:
            count = 0
            last = b"\n"
            for chunk in self._chunks():
                count += chunk.count(b"\n")
                last = chunk[-1:]
            self._len = count + (last != b"\n")
        return self._len

    # -- parsing ------------------------------------------------------------------------------

    def _fail(self, lineno: int, what: str) -> DataError:
        return _RecordError(f"{self.path}:{lineno}: {what}", what)

    def _parse(self, lineno: int, line: bytes) -> Document:
        if not line.strip():
            raise self._fail(lineno, "empty line")
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as uexc:
                raise self._fail(lineno, f"invalid UTF-8 at byte {uexc.start}") from None
            raise self._fail(lineno, f"malformed JSON: {exc}") from None
        if not isinstance(record, dict):
            raise self._fail(lineno, f"expected a JSON object, got {_type_name(record)}")
        if self.field not in record:
            hint = " (the record has 'messages'; set field: \"messages\")" if "messages" in record else ""
            raise self._fail(lineno, f"missing field {self.field!r}{hint}")
        value = record[self.field]
        doc_id = self._doc_id(lineno, record)
        meta = {k: v for k, v in record.items() if k != self.field and k != self.id_field} or None
        if isinstance(value, str):
            return Document(id=doc_id, text=value, meta=meta)
        if isinstance(value, list):
            return Document(id=doc_id, messages=self._messages(lineno, value), meta=meta)
        raise self._fail(
            lineno, f"field {self.field!r} must be a string or a list of messages, got {_type_name(value)}"
        )

    def _messages(self, lineno: int, value: list[Any]) -> tuple[dict[str, str], ...]:
        if not value:
            raise self._fail(lineno, f"field {self.field!r} is an empty list of messages")
        out = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise self._fail(lineno, f"{self.field}[{i}] must be an object, got {_type_name(msg)}")
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    got = "missing" if key not in msg else _type_name(msg[key])
                    raise self._fail(lineno, f"{self.field}[{i}].{key} must be a string, got {got}")
            out.append({"role": msg["role"], "content": msg["content"]})
        return tuple(out)

    def _doc_id(self, lineno: int, record: dict[str, Any]) -> str:
        if self.id_field is None:
            return f"{self._file_name}:{lineno}"
        if self.id_field not in record:
            raise self._fail(lineno, f"missing id field {self.id_field!r}")
        value = record[self.id_field]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self._fail(lineno, f"id field {self.id_field!r} must be a string or integer, got {_type_name(value)}")
        return str(value)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def build_jsonl_source(spec: JsonlSourceSpec, ctx: SourceContext) -> JsonlSource:
    """Quarantine goes to ``<work_dir>/quarantine/<source name>.jsonl`` (in memory without a work dir)."""
    path = spec.path if os.path.isabs(spec.path) else os.path.join(ctx.base_dir, spec.path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    name = spec.name or os.path.basename(path)
    quarantine = None
    if spec.on_error == "skip" and ctx.work_dir:
        quarantine = os.path.join(ctx.work_dir, "quarantine", re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".jsonl")
    return JsonlSource(
        path, name=spec.name, field=spec.field, id_field=spec.id_field,
        on_error=spec.on_error, max_skip_fraction=spec.max_skip_fraction, quarantine_path=quarantine,
    )


@hookimpl
def phi4_register_data_sources(register):
    register("jsonl", JsonlSourceSpec, build_jsonl_source)
