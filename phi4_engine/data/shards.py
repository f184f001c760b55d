"""Prepared token shards: the on-disk format, its writer, its reader, and the manifest.

A prepared directory (``phi4-engine data prepare``) holds, per source, numbered shards::

    DIR/manifest.json          written last: a directory without it is not (completely) prepared
    DIR/<source>-00000.bin     tokens: flat little-endian uint32; each document's ids, then EOS
    DIR/<source>-00000.idx     offsets: little-endian uint64, documents + 1 of them, first 0,
                               last the shard's token count; document i = bin[idx[i]:idx[i+1]]

A ``.bin`` file is the packed token stream itself (document boundaries are EOS tokens), so a
document's ids without its EOS are ``bin[idx[i]:idx[i+1] - 1]``. A shard holds whole documents
and at most ``max_shard_tokens`` tokens (a longer document gets a shard of its own).
``<source>`` is the source's name with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``.

``manifest.json``::

    {"format": "phi4-engine-shards", "version": 1, "dtype": "uint32", "byteorder": "little",
     "max_shard_tokens": N, "tokenizer": {"name", "vocab_size", "eos_id", "fingerprint", "spec"},
     "origin": {"spec", "stage"},
     "sources": [{"name", "kind", "spec", "documents", "tokens",
                  "shards": [{"file", "documents", "tokens", "bytes", "sha256",
                              "index", "index_bytes", "index_sha256"}]}]}

Writing is atomic per file (``.<file>.tmp-<pid>``, fsync, rename) and the manifest comes last.
Reading (:class:`ShardSource`) checks every file's size when the source is opened, and each
shard's sha256 (and its offsets' consistency) the first time that shard is read; a mismatch is a
one-line :class:`~phi4_engine.errors.DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from phi4_engine.data.source import Document
from phi4_engine.errors import DataError

FORMAT = "phi4-engine-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")
DEFAULT_MAX_SHARD_TOKENS = 1 << 28
"""256 Mi tokens = 1 GiB per ``.bin`` file."""


def file_stem(name: str) -> str:
    """The file-name stem of a source's shards."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "source"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def write_manifest(out_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file, fsync, rename, directory fsync)."""
    path = Path(out_dir) / MANIFEST
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(json.dumps(manifest, indent=2).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Appends tokenized documents of one source to numbered shards in ``out_dir``.

    :meth:`add` takes a chunk: the concatenated ids (each document's followed by its EOS) and
    the per-document lengths (EOS included). :meth:`close` returns the manifest's shard entries;
    :meth:`abort` removes what this writer wrote (temp files and finished shards).
    """

    def __init__(self, out_dir: str | os.PathLike[str], stem: str, max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS):
        if max_shard_tokens < 1:
            raise ValueError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.max_shard_tokens = max_shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.written: list[Path] = []
        self._file = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._tokens = 0
        self._docs = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens) or (lengths < 1).any():
            raise ValueError("lengths must be >= 1 and sum to len(tokens)")
        ends = np.cumsum(lengths)
        done = 0  # documents of this chunk written
        while done < len(lengths):
            base = int(ends[done - 1]) if done else 0
            room = self.max_shard_tokens - self._tokens
            take = int(np.searchsorted(ends, base + room, side="right")) - done
            if take <= 0:
                if self._docs:
                    self._finish_shard()
                    continue
                take = 1  # one document longer than a shard: it gets a shard of its own
            stop = int(ends[done + take - 1])
            self._write(tokens[base:stop], lengths[done:done + take])
            done += take

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._file is None:
            self._tmp = _tmp(self.out_dir / f"{self.stem}-{len(self.shards):05d}.bin")
            self._file = open(self._tmp, "wb")
            self._hash = hashlib.sha256()
        data = memoryview(tokens).cast("B")
        self._file.write(data)
        self._hash.update(data)
        self._lengths.append(lengths)
        self._tokens += len(tokens)
        self._docs += len(lengths)

    def _finish_shard(self) -> None:
        assert self._file is not None and self._tmp is not None
        name = f"{self.stem}-{len(self.shards):05d}"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        offsets = np.zeros(self._docs + 1, dtype=OFFSET_DTYPE)
        np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        index_bytes = offsets.tobytes()
        index_path = self.out_dir / f"{name}.idx"
        index_tmp = _tmp(index_path)
        with open(index_tmp, "wb") as f:
            f.write(index_bytes)
            f.flush()
            os.fsync(f.fileno())
        bin_path = self.out_dir / f"{name}.bin"
        _commit(self._tmp, bin_path)
        self.written.append(bin_path)
        _commit(index_tmp, index_path)
        self.written.append(index_path)
        self.shards.append({
            "file": bin_path.name, "documents": self._docs, "tokens": self._tokens,
            "bytes": self._tokens * TOKEN_DTYPE.itemsize, "sha256": self._hash.hexdigest(),
            "index": index_path.name, "index_bytes": len(index_bytes),
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        })  # fmt: skip
        self._tmp = None
        self._lengths = []
        self._tokens = self._docs = 0

    def close(self) -> list[dict[str, Any]]:
        if self._docs:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in [self._tmp, *self.written]:
            if path is not None:
                path.unlink(missing_ok=True)
        self._tmp = None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared directory; DataError when missing or not ours."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: not a prepared shards directory (no {MANIFEST}; run 'phi4-engine data prepare')") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{file}: manifest version {manifest.get('version')} is not {VERSION}")
    return manifest


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardSource:
    """One source of a prepared directory as a :class:`~phi4_engine.data.DataSource`.

    Documents are ``Document(id="<source>:<i>", tokens=<uint32 view without EOS>)``, zero-copy
    slices of the memory-mapped shard. ``source`` may be omitted when the manifest holds one.
    """

    def __init__(self, path: str | os.PathLike[str], source: str | None = None, *, name: str | None = None, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        entries = {s["name"]: s for s in self.manifest["sources"]}
        if source is None:
            if len(entries) != 1:
                raise DataError(f"{self.path}: holds sources {', '.join(entries)}; choose one with 'source'")
            source = next(iter(entries))
        if source not in entries:
            raise DataError(f"{self.path}: no source {source!r} in {MANIFEST} (sources: {', '.join(entries)})")
        self.entry = entries[source]
        self.name = name or source
        self.verify = verify
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        self._shards: list[dict[str, Any]] = self.entry["shards"]
        self._starts = [0]
        for shard in self._shards:
            self._starts.append(self._starts[-1] + int(shard["documents"]))
        self._verified: set[int] = set()  # shards whose hash and offsets were checked
        for shard in self._shards:  # the size check, always
            self._check_size(self.path / shard["file"], shard["bytes"])
            self._check_size(self.path / shard["index"], shard["index_bytes"])

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def tokens(self) -> int:
        """Tokens in the source, one EOS per document included."""
        return int(self.entry["tokens"])

    def check_tokenizer(self, tokenizer: Any) -> None:
        """DataError unless ``tokenizer`` is the one these shards were prepared with."""
        info = self.manifest["tokenizer"]
        ours = {"vocab_size": getattr(tokenizer, "vocab_size", None), "eos_id": getattr(tokenizer, "eos_id", None)}
        if info.get("fingerprint") is not None:
            ours["fingerprint"] = getattr(tokenizer, "fingerprint", None)
        for key, value in ours.items():
            if value is not None and value != info.get(key):
                raise DataError(
                    f"{self.path}: prepared with tokenizer {info.get('name')!r} ({key} {info.get(key)}), "
                    f"the run uses {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} ({key} {value}); "
                    "prepare the data again with this spec's tokenizer"
                )

    def _check_size(self, file: Path, expected: int) -> None:
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{file}: shard file missing") from None
        if size != expected:
            raise DataError(f"{file}: size {size} bytes, manifest says {expected} (truncated or modified)")

    def _shard(self, k: int) -> tuple[np.ndarray, list[int]]:
        """Tokens (memory-mapped) and offsets of shard ``k``: sizes and offsets checked on every
        open, the sha256 on the first.

        Not cached: the map is released when the last view of it goes (one open file per shard
        being read, however many shards a corpus has).
        """
        shard = self._shards[k]
        file, index = self.path / shard["file"], self.path / shard["index"]
        self._check_size(file, shard["bytes"])
        self._check_size(index, shard["index_bytes"])
        if self.verify and k not in self._verified:
            for path, key in ((file, "sha256"), (index, "index_sha256")):
                if _digest(path) != shard[key]:
                    raise DataError(f"{path}: sha256 does not match {MANIFEST} (corrupt or modified shard)")
        with open(file, "rb") as f:
            tokens = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=TOKEN_DTYPE)
        offsets = np.fromfile(index, dtype=OFFSET_DTYPE)
        ok = (
            len(offsets) == shard["documents"] + 1 and offsets[0] == 0 and offsets[-1] == len(tokens)
            and bool((np.diff(offsets) >= 1).all()) and bool((tokens[offsets[1:].astype(np.int64) - 1] == self.eos_id).all())
        )  # fmt: skip
        if not ok:
            raise DataError(f"{index}: document offsets do not match {file.name} (corrupt shard)")
        self._verified.add(k)
        return tokens, offsets.tolist()

    def documents(self, start: int = 0) -> Iterator[Document]:
        start = max(start, 0)
        name = self.name
        for k in range(max(bisect_right(self._starts, start) - 1, 0), len(self._shards)):
            tokens, offsets = self._shard(k)
            base = self._starts[k]
            for j in range(max(start - base, 0), len(offsets) - 1):
                yield Document(id=f"{name}:{base + j}", tokens=tokens[offsets[j]:offsets[j + 1] - 1])
