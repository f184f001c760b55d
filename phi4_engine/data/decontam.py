"""Benchmark decontamination ([P4] App. B.1, Alg. 1; FACTS.md §3): drop training documents that
share long n-grams with evaluation items, so the evals measure generalization, not recall.

**Algorithm.** Text is normalized and hashed as in :mod:`phi4_engine.data.ngrams` (lowercase,
punctuation as word breaks). A document is *contaminated (ngram)* when one of its
``ngram``-grams (13) is among the benchmarks' ``ngram``-grams minus the allow-list's.
Otherwise, per benchmark item, ``ratio = |doc 7-grams ∩ item 7-grams| / min(|doc 7-grams|,
|item 7-grams|)`` (unique ``ratio_ngram``-grams); the largest ratio ``> info_threshold`` makes
it *contaminated (ratio)* if ``>= contaminated_threshold``, else *partial* (kept, reported).
An inverted index (7-gram → items) makes the cost follow the matches, not the item count.
Our one addition to Alg. 1: allow-listed 7-grams never count as overlap either, so an item
that is mostly a common phrase is not dropped by the ratio after the 13-gram check let it be.

What the ratio catches in practice: without a shared 13-gram, common runs are at most 12
words, i.e. at most 6 shared 7-grams per ~13 words, so a long document against a long item
stays near 0.5. The ratio mainly drops short items (< 13 words, no 13-grams at all, e.g.
trivia questions) found in documents, and short documents that are fragments of an item.

:class:`DecontaminatedSource` wraps any data source and keeps its contract: one scan at build
time classifies every document; positions then map onto the kept ones, so ``documents(start)``
still resumes by position and ``len()`` is the kept count. The spec section is
:class:`phi4_engine.training.DecontaminationSection` (there, so validating a spec does not
import numpy).
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import orjson

from phi4_engine.data.ngrams import KeySet, grams, text_grams, word_hashes
from phi4_engine.data.source import DataSource, Document
from phi4_engine.errors import DataError

if TYPE_CHECKING:
    from phi4_engine.training import DecontaminationSection

_EXAMPLES = 5
_BATCH_DOCS, _BATCH_BYTES = 256, 1 << 20
"""Documents are checked in batches (numpy call overhead is per batch, not per document)."""


class Verdict(NamedTuple):
    status: str
    """``clean``, ``partial`` (kept, reported) or ``contaminated`` (dropped)."""
    reason: str | None = None
    """``ngram`` (an exact long n-gram) or ``ratio`` (7-gram overlap); None when clean."""
    item: str | None = None
    """The benchmark item matched (``<file>:<line>``)."""
    ratio: float | None = None
    """The largest 7-gram overlap ratio (None for an ``ngram`` hit: the ratio is not computed)."""


_CLEAN = Verdict("clean")


def _unique(parts: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


class DecontaminationIndex:
    """N-gram sets of the benchmark items, queried per batch of training documents."""

    def __init__(
        self, items: Sequence[tuple[str, str]], allow: Sequence[str] = (), *, ngram: int = 13,
        ratio_ngram: int = 7, info_threshold: float = 0.5, contaminated_threshold: float = 0.8,
    ) -> None:
        self.n, self.r = ngram, ratio_ngram
        self.info, self.contaminated = info_threshold, contaminated_threshold
        self.item_ids = [item_id for item_id, _ in items]
        allowed = [text_grams(text, ngram, ratio_ngram) for text in allow]
        allow_long, allow_short = _unique([a for a, _ in allowed]), _unique([b for _, b in allowed])
        longs, long_items, shorts, short_items, sizes = [], [], [], [], []
        for j, (_, text) in enumerate(items):
            long, short = (np.unique(g) for g in text_grams(text, ngram, ratio_ngram))
            longs.append(long)
            long_items.append(np.full(len(long), j, dtype=np.int64))
            sizes.append(len(short))
            short = short[~np.isin(short, allow_short)]
            shorts.append(short)
            short_items.append(np.full(len(short), j, dtype=np.int64))
        self.item_sizes = np.array(sizes, dtype=np.int64)
        keys = np.concatenate(longs) if longs else np.zeros(0, dtype=np.uint64)
        owners = np.concatenate(long_items) if longs else np.zeros(0, dtype=np.int64)
        keep = ~np.isin(keys, allow_long)
        long_keys, first = np.unique(keys[keep], return_index=True)
        self.long = KeySet(long_keys)
        self.long_items = owners[keep][first]  # one item per n-gram, for the report
        keys = np.concatenate(shorts) if shorts else np.zeros(0, dtype=np.uint64)
        owners = np.concatenate(short_items) if shorts else np.zeros(0, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys, self.postings = keys[order], owners[order]  # inverted index: 7-gram -> items
        short_keys, starts = np.unique(keys, return_index=True)
        self.short = KeySet(short_keys)
        self.offsets = np.append(starts, len(keys)).astype(np.int64)

    @classmethod
    def from_section(cls, section: "DecontaminationSection") -> "DecontaminationIndex":
        items = [item for path in section.benchmarks for item in read_benchmark(path, section.field)]
        allow: list[str] = []
        if section.allow_list:
            allow = Path(section.allow_list).read_text(encoding="utf-8", errors="replace").splitlines()
        return cls(items, allow, ngram=section.ngram, ratio_ngram=section.ratio_ngram,
                   info_threshold=section.info_threshold, contaminated_threshold=section.contaminated_threshold)

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]

    def check_many(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text; n-grams never span two texts."""
        verdicts = [_CLEAN] * len(texts)
        ids, doc = word_hashes(texts)
        long, short = grams(ids, self.n, self.r)
        dropped = np.zeros(len(texts), dtype=bool)
        qi, ki = self.long.find(long)
        qi, ki, d = _same_doc(qi, ki, doc, self.n)
        found, first = np.unique(d, return_index=True)  # the first hit of each document
        for x, f in zip(found.tolist(), first.tolist()):
            verdicts[x] = Verdict("contaminated", "ngram", self.item_ids[self.long_items[ki[f]]])
        dropped[found] = True
        qi, ki = self.short.find(short)
        qi, ki, d = _same_doc(qi, ki, doc, self.r)
        keep = ~dropped[d]
        if not keep.any():
            return verdicts
        k = np.int64(len(self.short))  # distinct (document, 7-gram) pairs
        pairs = np.unique(d[keep].astype(np.int64) * k + ki[keep].astype(np.int64))
        d, ki = pairs // k, pairs % k
        starts = self.offsets[ki]
        lens = self.offsets[ki + 1] - starts
        gather = np.arange(lens.sum()) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
        n_items = np.int64(max(len(self.item_ids), 1))
        cells, overlap = np.unique(np.repeat(d, lens) * n_items + self.postings[gather], return_counts=True)
        d, item = cells // n_items, cells % n_items
        doc_size = np.zeros(len(texts), dtype=np.int64)
        for x in np.unique(d).tolist():  # unique 7-grams of the few documents with a match
            lo, hi = np.searchsorted(doc, x), np.searchsorted(doc, x, side="right")
            doc_size[x] = len(np.unique(short[lo:max(hi - self.r + 1, lo)]))
        ratios = overlap / np.minimum(doc_size[d], self.item_sizes[item])
        order = np.lexsort((-ratios, d))  # per document, the largest ratio (first item on ties)
        best = order[np.flatnonzero(np.r_[True, d[order][1:] != d[order][:-1]])]
        for b in best.tolist():
            ratio = float(ratios[b])
            if ratio > self.info:
                status = "contaminated" if ratio >= self.contaminated else "partial"
                verdicts[int(d[b])] = Verdict(status, "ratio", self.item_ids[int(item[b])], ratio)
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {"items": len(self.item_ids), "ngram": self.n, "ratio_ngram": self.r,
                "ngram_keys": len(self.long), "ratio_keys": len(self.short),
                "info_threshold": self.info, "contaminated_threshold": self.contaminated}


def _same_doc(qi: np.ndarray, ki: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the n-gram hits whose first and last words are in the same document."""
    d = doc[qi]
    ok = d == doc[qi + n - 1]
    return qi[ok], ki[ok], d[ok]


def read_benchmark(path: str, field: str = "text") -> list[tuple[str, str]]:
    """``[(item id, text)]`` of a benchmark file (see :class:`DecontaminationSection`)."""
    name = os.path.basename(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read benchmark: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    if path.endswith(".txt"):
        return [(f"{name}:{i}", line.decode("utf-8", errors="replace")) for i, line in enumerate(lines, 1) if line.strip()]
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: malformed JSON: {exc}") from None
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(value, list):
            value = "\n".join(v if isinstance(v, str) else str(v.get("content", "")) if isinstance(v, dict) else ""
                              for v in value)
        if not isinstance(value, str):
            raise DataError(f"{path}:{i}: benchmark record needs a string (or list) field {field!r}")
        items.append((f"{name}:{i}", value))
    return items


def document_text(doc: Document, decode: Callable[[Any], str] | None = None, source: str = "") -> str:
    """What is checked: the text, every message's content for chat records, or the decoded
    ``tokens`` of a pre-tokenized document (an error without ``decode``: never pass silently)."""
    if doc.messages is not None:
        return "\n".join(m.get("content", "") for m in doc.messages)
    if not doc.text and doc.tokens is not None and len(doc.tokens):
        if decode is None:
            raise DataError(f"data source {source!r}: document {doc.id} is pre-tokenized; decontamination needs a tokenizer to decode it")
        return decode(doc.tokens.tolist() if hasattr(doc.tokens, "tolist") else list(doc.tokens))
    return doc.text


class DecontaminatedSource:
    """``source`` without its contaminated documents; a :class:`~phi4_engine.data.DataSource`."""

    def __init__(
        self, source: DataSource, index: DecontaminationIndex, decode: Callable[[Any], str] | None = None
    ) -> None:
        """Scan ``source`` once; ``decode`` turns token ids back into text (pre-tokenized sources)."""
        self.inner = source
        self.name = source.name
        kept = array("q")
        counts = {"scanned": 0, "kept": 0, "partial": 0, "ngram": 0, "ratio": 0}
        examples: dict[str, list[dict[str, Any]]] = {"ngram": [], "ratio": [], "partial": []}

        def flush(batch: list[Document], texts: list[str]) -> None:
            for doc, verdict in zip(batch, index.check_many(texts)):
                position = counts["scanned"]
                counts["scanned"] += 1
                if verdict.status != "contaminated":
                    kept.append(position)
                    counts["kept"] += 1
                if verdict.status == "clean":
                    continue
                key = verdict.reason if verdict.status == "contaminated" else "partial"
                counts[key] += 1  # type: ignore[index]
                if len(examples[key]) < _EXAMPLES:  # type: ignore[index]
                    examples[key].append({"id": doc.id, "item": verdict.item, "ratio": verdict.ratio})  # type: ignore[index]

        batch: list[Document] = []
        texts: list[str] = []
        size = 0
        for doc in source.documents(0):
            batch.append(doc)
            texts.append(document_text(doc, decode, self.name))
            size += len(texts[-1])
            if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
                flush(batch, texts)
                batch, texts, size = [], [], 0
        if batch:
            flush(batch, texts)
        self._kept = kept
        self._report = {
            "source": self.name, "scanned": counts["scanned"], "kept": counts["kept"],
            "dropped": {"ngram": counts["ngram"], "ratio": counts["ratio"]},
            "partial": counts["partial"], "examples": examples,
        }

    def documents(self, start: int = 0) -> Iterator[Document]:
        kept = self._kept
        if start >= len(kept):
            return
        j = start
        for position, doc in enumerate(self.inner.documents(kept[start]), kept[start]):
            if position == kept[j]:
                yield doc
                j += 1
                if j == len(kept):
                    return

    def __len__(self) -> int:
        return len(self._kept)

    def report(self) -> dict[str, Any]:
        """Scanned, kept, dropped by reason (``ngram``/``ratio``), partial, and up to 5 examples each."""
        return orjson.loads(orjson.dumps(self._report))


def write_report(path: str, index: DecontaminationIndex, reports: list[dict[str, Any]]) -> None:
    """Merge ``reports`` (by source name) into ``path``, atomically: every rank may write it."""
    from phi4_engine.rundir import atomic_write

    sources: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            sources = orjson.loads(Path(path).read_bytes()).get("sources", {})
        except (orjson.JSONDecodeError, AttributeError):
            sources = {}
    sources.update({r["source"]: r for r in reports})
    atomic_write(Path(path), orjson.dumps({"index": index.describe(), "sources": sources}, option=orjson.OPT_INDENT_2))
