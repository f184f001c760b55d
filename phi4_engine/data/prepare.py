"""``phi4-engine data prepare``: tokenize a stage's data sources once into token shards.

The main process reads each source's documents in order and cuts them into chunks of about
``CHUNK_CHARS`` characters. ``workers`` processes encode whole chunks: the main process and a
pool of ``workers - 1`` (``forkserver`` where available, else ``spawn``; the tokenizer pickles
as "rebuild from the shipped file"). A chunk goes to the pool while it has fewer than two
chunks per process queued, else the main process encodes it itself (so the pool's start-up is
not idle time); results are written in file order, with a bounded number in flight. Every
document is encoded on its own, so the shards are byte-identical for any worker count. The
format is in :mod:`phi4_engine.data.shards`; a directory is complete only once its manifest
exists.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from phi4_engine.data.shards import (
    DEFAULT_MAX_SHARD_TOKENS, FORMAT, MANIFEST, VERSION, ShardWriter, file_stem, read_manifest, write_manifest,
)  # fmt: skip
from phi4_engine.errors import DataError, EngineError, SpecError, UsageError

if TYPE_CHECKING:
    from phi4_engine.engine import Engine

CHUNK_CHARS = 1 << 20
"""Characters of text per chunk sent to a worker (about 250K tokens of English)."""


@dataclass
class PrepareInput:
    """One source to prepare: its manifest name and kind, its resolved spec, the source."""

    name: str
    kind: str
    spec: dict[str, Any]
    source: Any


# -- encoding (in the pool's processes and in the main one) -------------------------------

def _array_encoder(tokenizer: Any) -> Callable[[str], np.ndarray]:
    from phi4_engine.tokenizer import Phi4Tokenizer

    if isinstance(tokenizer, Phi4Tokenizer):  # its encode() is tiktoken's encode_ordinary
        encoding = tokenizer.encoding

        def encode(text: str) -> np.ndarray:
            try:  # tiktoken's uint32 buffer: no list of Python ints
                return encoding.encode_to_numpy(text, disallowed_special=())
            except UnicodeEncodeError:  # lone surrogates: encode() knows the fallback
                return np.asarray(tokenizer.encode(text), dtype=np.uint32)

        return encode
    return lambda text: np.asarray(tokenizer.encode(text), dtype=np.uint32)


def encode_chunk(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: each text's ids followed by EOS, concatenated; lengths include EOS."""
    encode = _array_encoder(tokenizer)
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = encode(text)
        parts.append(ids)
        parts.append(eos)
        lengths[i] = len(ids) + 1
    return np.concatenate(parts), lengths


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_worker_tokenizer, texts)


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["phi4_engine.data.prepare", "phi4_engine.tokenizer"])
        return ctx
    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- reading ---------------------------------------------------------------------------------

def _chunks(item: PrepareInput) -> Iterator[list[str]]:
    texts: list[str] = []
    size = 0
    for doc in item.source.documents(0):
        if doc.messages is not None or doc.tokens is not None or not isinstance(doc.text, str):
            what = "is a chat record (messages)" if doc.messages is not None else (
                "is already tokenized" if doc.tokens is not None else "has no text")
            raise DataError(f"data source {item.name!r}: document {doc.id} {what}; data prepare takes text documents")
        texts.append(doc.text)
        size += len(doc.text)
        if size >= CHUNK_CHARS:
            yield texts
            texts, size = [], 0
    if texts:
        yield texts


class _Progress:
    """A rich progress bar per source with documents, tokens and tokens/s (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(file=sys.stderr),
            )  # fmt: skip
            self.bar.start()
        self.started: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def add(self, item: PrepareInput) -> int:
        if self.bar is None:
            return 0
        try:
            total = len(item.source)
        except TypeError:
            total = None
        task = self.bar.add_task(item.name, total=total, info="")
        self.started[task], self.tokens[task] = time.perf_counter(), 0
        return task

    def advance(self, task: int, documents: int, tokens: int) -> None:
        if self.bar is not None:
            self.tokens[task] += tokens
            rate = self.tokens[task] / max(time.perf_counter() - self.started[task], 1e-9)
            self.bar.update(task, advance=documents, info=f"{self.tokens[task]:,} tokens  {rate / 1e6:.2f}M tok/s")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- driver ----------------------------------------------------------------------------------

def write_shards(
    items: list[PrepareInput], tokenizer: Any, out: str | os.PathLike[str], *, workers: int = 1,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS, force: bool = False, progress: bool = False,
    origin: dict[str, Any] | None = None, tokenizer_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``items`` into ``out`` and write its manifest (last); returns the manifest."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    stems = [file_stem(item.name) for item in items]
    for i, stem in enumerate(stems):
        if stem in stems[:i]:
            raise SpecError(f"two data sources would write shards named {stem!r}; give them distinct 'name's")
    out = Path(out)
    old_files = _clear(out, force)
    writers: list[ShardWriter] = []
    bar = _Progress(progress)
    pool = None
    if workers > 1:  # the main process is one of the workers: it encodes whenever the pool is busy
        pool = ProcessPoolExecutor(workers - 1, mp_context=_context(), initializer=_init_worker, initargs=(tokenizer,))
    pending: deque[tuple[ShardWriter, int, Any]] = deque()  # in file order: a Future or a result

    def settle() -> None:
        writer, task, result = pending.popleft()
        if isinstance(result, Future):
            try:
                result = result.result()
            except BrokenProcessPool as exc:
                raise EngineError(f"data prepare: a tokenizer worker process died ({exc})") from None
        tokens, lengths = result
        writer.add(tokens, lengths)
        bar.advance(task, len(lengths), len(tokens))

    try:
        for item, stem in zip(items, stems):
            writer = ShardWriter(out, stem, max_shard_tokens)
            writers.append(writer)
            task = bar.add(item)
            for texts in _chunks(item):
                busy = sum(isinstance(r, Future) and not r.done() for _, _, r in pending)
                if pool is not None and busy < 2 * (workers - 1):
                    pending.append((writer, task, pool.submit(_encode_in_worker, texts)))
                else:
                    pending.append((writer, task, encode_chunk(tokenizer, texts)))
                while pending and (len(pending) > 4 * workers or not isinstance(pending[0][2], Future) or pending[0][2].done()):
                    settle()
        while pending:
            settle()
        sources = []
        for item, writer in zip(items, writers):
            shards = writer.close()
            if not shards:
                raise DataError(f"data source {item.name!r} has no documents")
            sources.append({
                "name": item.name, "kind": item.kind, "spec": item.spec,
                "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "shards": shards,
            })  # fmt: skip
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.stop()
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": "uint32", "byteorder": "little",
        "max_shard_tokens": max_shard_tokens,
        "tokenizer": {
            "name": getattr(tokenizer, "name", type(tokenizer).__name__), "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "fingerprint": getattr(tokenizer, "fingerprint", None), "spec": tokenizer_spec,
        },
        "origin": origin or {},
        "sources": sources,
    }  # fmt: skip
    write_manifest(out, manifest)
    keep = {f for s in sources for shard in s["shards"] for f in (shard["file"], shard["index"])}
    for name in old_files - keep:  # shards of a replaced preparation that this one did not rewrite
        (out / name).unlink(missing_ok=True)
    return manifest


def _clear(out: Path, force: bool) -> set[str]:
    """Make ``out`` ready: refuse a non-empty one unless ``force``; then drop its manifest first."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return set()
    if not force:
        raise UsageError(f"--out {out}: directory is not empty (use --force to replace a prepared directory)")
    old: set[str] = set()
    try:
        for s in read_manifest(out)["sources"]:
            old |= {f for shard in s["shards"] for f in (shard["file"], shard["index"])}
    except (DataError, KeyError, TypeError):
        pass
    (out / MANIFEST).unlink(missing_ok=True)  # from now on the directory is not complete
    return old


def select_stage(engine: "Engine", stage: str | None) -> Any:
    """The stage named ``stage``, or the first one that has ``data.sources``."""
    stages = engine.validate().stages
    names = [s.name for s in stages]  # type: ignore[attr-defined]
    if stage is not None:
        if stage not in names:
            raise SpecError(f"{engine.origin}: --stage: no stage named {stage!r} (stages: {', '.join(names)})")
        chosen = stages[names.index(stage)]
        if not getattr(getattr(chosen, "data", None), "sources", None):
            raise SpecError(f"{engine.origin}: --stage: stage {stage!r} has no data.sources to prepare")
        return chosen
    for s in stages:
        if getattr(getattr(s, "data", None), "sources", None):
            return s
    raise SpecError(f"{engine.origin}: no stage has data.sources to prepare")


def prepare(
    engine: "Engine", out: str | os.PathLike[str], *, stage: str | None = None, workers: int | None = None,
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS, force: bool = False, progress: bool | None = None,
) -> dict[str, Any]:
    """Tokenize the data sources of ``stage`` (default: the first stage with ``data.sources``)
    of ``engine``'s spec with its tokenizer into ``out``; returns the manifest."""
    from phi4_engine.data.source import SourceContext

    spec = engine.validate()
    chosen = select_stage(engine, stage)
    tokenizer = engine.registry.build("tokenizer", spec.tokenizer)
    ctx = SourceContext(base_dir=engine.base_dir, seed=spec.seed)
    items = []
    for src_spec in chosen.data.sources:
        source = engine.registry.build("data_source", src_spec, ctx)
        name = getattr(source, "name", None) or src_spec.name or src_spec.kind
        items.append(PrepareInput(name, src_spec.kind, src_spec.model_dump(mode="json"), source))
    if progress is None:
        progress = spec.logging.progress and os.environ.get("PHI4_ENGINE_PROGRESS", "1") != "0"
    return write_shards(
        items, tokenizer, out, workers=default_workers() if workers is None else workers, max_shard_tokens=max_shard_tokens,
        force=force, progress=progress, origin={"spec": engine.origin, "stage": chosen.name},
        tokenizer_spec=spec.tokenizer.model_dump(mode="json"),
    )  # fmt: skip
