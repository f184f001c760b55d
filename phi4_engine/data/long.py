"""Long documents for midtraining: natively long ones first, concatenations as a fallback.

The paper (FACTS.md §3) filters academic/books/code to documents longer than 8K tokens and
notes that natively long documents beat long samples made by padding or concatenating short
ones; synthetic long samples are still allowed. ``LongDocuments`` wraps any source: documents
of at least ``min_tokens`` tokens come first, in source order; the remaining short ones are then
joined, in order, into synthetic long documents (marked ``meta["synthetic_long"]``). The index
is built once (one tokenizing pass), so ``documents(start)`` resumes by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from phi4_engine.data.source import DataSource, Document
from phi4_engine.errors import DataError


@dataclass(frozen=True)
class _Group:
    members: tuple[int, ...]  # positions in the wrapped source
    synthetic: bool


class LongDocuments:
    def __init__(self, source: DataSource, tokenizer: Any, min_tokens: int) -> None:
        self.source = source
        self.name = source.name
        self.min_tokens = min_tokens
        docs = list(source.documents())
        if any(d.messages is not None for d in docs):
            raise DataError(f"data source {source.name!r}: long-document sources must hold text, not chat records")
        self._docs = docs
        lengths = [len(t) + 1 for t in tokenizer.encode_batch([d.text for d in docs])]
        native = [_Group((i,), False) for i, n in enumerate(lengths) if n >= min_tokens]
        joined: list[_Group] = []
        current: list[int] = []
        total = 0
        for i, n in enumerate(lengths):
            if n >= min_tokens:
                continue
            current.append(i)
            total += n
            if total >= min_tokens:
                joined.append(_Group(tuple(current), True))
                current, total = [], 0
        self._groups = native + joined
        if not self._groups:
            raise DataError(
                f"data source {source.name!r} holds {sum(lengths)} tokens in all: too little for one "
                f"document of {min_tokens} tokens"
            )
        self.native = len(native)
        self.synthetic = len(joined)

    def __len__(self) -> int:
        return len(self._groups)

    def documents(self, start: int = 0) -> Iterator[Document]:
        for group in self._groups[start:]:
            if not group.synthetic:
                yield self._docs[group.members[0]]
                continue
            parts = [self._docs[i] for i in group.members]
            yield Document(
                id="+".join((parts[0].id, parts[-1].id)),
                text="\n\n".join(p.text for p in parts),
                meta={"synthetic_long": True, "parts": len(parts)},
            )

    def report(self) -> dict[str, int]:
        return {"native_long": self.native, "synthetic_long": self.synthetic, "min_tokens": self.min_tokens}
