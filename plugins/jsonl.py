"""Built-in data source ``jsonl``: one JSON object per line, plain or zstandard-compressed.

Strict by design: a malformed line, a missing or mistyped field, invalid UTF-8, an empty line
or a truncated ``.zst`` stream raises :class:`~phi4_engine.errors.DataError` naming
``file:line``. A truncated ``.zst`` is detected by checking that every zstd frame reached its
end (streaming readers otherwise return the partial data silently, FACTS.md §7.6).

Records are either text (``{"text": "..."}``, the field is configurable) or chat records
(``{"messages": [{"role": "user", "content": "..."}, ...]}``, with ``field: "messages"``).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Literal

import orjson
import zstandard
from pydantic import ValidationInfo, field_validator

from phi4_engine import hookimpl
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

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class JsonlSource:
    """A JSONL file as a :class:`~phi4_engine.data.DataSource`; record ``i`` is line ``i + 1``."""

    def __init__(self, path: str, *, name: str | None = None, field: str = "text", id_field: str | None = None):
        self.path = path
        self.name = name or os.path.basename(path)
        self.field = field
        self.id_field = id_field
        self._file_name = os.path.basename(path)
        self._len: int | None = None

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
        for lineno, line in self._lines(start):
            yield self._parse(lineno, line)

    def __len__(self) -> int:
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
        return DataError(f"{self.path}:{lineno}: {what}")

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
    path = spec.path if os.path.isabs(spec.path) else os.path.join(ctx.base_dir, spec.path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    return JsonlSource(path, name=spec.name, field=spec.field, id_field=spec.id_field)


@hookimpl
def phi4_register_data_sources(register):
    register("jsonl", JsonlSourceSpec, build_jsonl_source)
