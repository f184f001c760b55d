"""The LM-stage batch iterator: weighted mixture of sources → token stream → packed samples.

**Mixing.** Weights are *token* fractions. The next document comes from the source with the
largest deficit ``w_i * total_tokens - tokens_i`` (normalized weights; ties → lowest index):
deterministic, no RNG, and the drawn fractions track the weights to within one document.
A source that ends restarts at position 0 (its next epoch).

**Packing.** Each document becomes ``encode(text) + [eos]`` (or ``tokens + [eos]`` for a
pre-tokenized document, e.g. from ``shards``) appended to one token stream, cut
into consecutive chunks of ``seq_len + 1`` tokens; a sample is ``(chunk[:-1], chunk[1:])``.
Document boundaries stay visible as EOS tokens.

**Data parallel.** Every rank builds the same stream; global sample ``k`` belongs to rank
``k % dp_world_size``. One batch cuts ``batch_size * dp_world_size`` samples (a global batch)
and keeps this rank's share, so after each batch every rank holds the *same* state and the
ranks together consume each sample exactly once.

**State.** :meth:`MixtureLoader.state_dict` holds only ints and lists of ints (it is
saved inside a DCP checkpoint): per source position/epoch/tokens/documents, the leftover
tokens and the sample counter. Loading it continues with exactly the next sample — also under
another data-parallel degree (the state is the same on every rank).
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Any, Iterator, Sequence

import torch

from phi4_engine.data.positions import document_positions
from phi4_engine.data.source import DataSource, Document
from phi4_engine.errors import DataError

IGNORE_INDEX = -100
"""Label of tokens that are not training targets (torchtitan's CrossEntropyLoss ignores it)."""

_STATE_VERSION = 1
_PREFETCH = 32
"""Documents tokenized at once per source (one ``encode_batch`` call)."""


class _Cursor:
    """One source's read position plus a small queue of tokenized, not yet drawn, documents."""

    __slots__ = ("source", "position", "epoch", "tokens", "documents", "unique_tokens", "_queue", "_iter", "_next")

    def __init__(self, source: DataSource):
        self.source = source
        self.position = 0  # index of the next document to draw
        self.epoch = 0  # completed passes
        self.tokens = 0
        self.documents = 0
        self.unique_tokens = 0  # tokens drawn during the first pass
        self.reset_reader()

    def reset_reader(self) -> None:
        self._queue: deque[tuple[int, array | BaseException]] = deque()
        self._iter: Iterator[Document] | None = None
        self._next = self.position  # index of the next document the reader yields


def _length(source: DataSource) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


class MixtureLoader:
    """Stateful, infinite iterator of ``({"input": LongTensor[B, S]}, labels LongTensor[B, S])``."""

    def __init__(
        self,
        sources: Sequence[tuple[DataSource, float]],
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        chat: bool = False,
    ):
        if not sources:
            raise DataError("a mixture needs at least one data source")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_world_size {dp_world_size}")
        weights = [float(w) for _, w in sources]
        if any(not w > 0 for w in weights):
            raise DataError(f"mixture weights must be > 0, got {weights}")
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_id)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._encode_batch = getattr(tokenizer, "encode_batch", None)
        for src, _ in sources:
            check = getattr(src, "check_tokenizer", None)  # pre-tokenized sources
            if check is not None:
                check(tokenizer)
        self._cursors = [_Cursor(src) for src, _ in sources]
        self._total_tokens = 0
        self._samples = 0  # global index of the next sample to cut
        self._buffer = array("q")  # the token stream not yet cut into samples
        # Chat mode: records are ChatML conversations and only assistant tokens are trained on;
        # ``_mask`` runs parallel to ``_buffer`` (1 = the token is a training target).
        self.chat = chat
        self._mask = array("b")

    # -- drawing documents --------------------------------------------------------------------

    def _pick(self) -> int:
        total = self._total_tokens
        best, best_deficit = 0, None
        for i, (w, cur) in enumerate(zip(self.weights, self._cursors)):
            deficit = w * total - cur.tokens
            if best_deficit is None or deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def _refill(self, cur: _Cursor) -> None:
        """Read and tokenize up to ``_PREFETCH`` documents of ``cur``'s source into its queue."""
        docs: list[tuple[int, Document]] = []
        wrapped = False
        while len(docs) < _PREFETCH:
            if cur._iter is None:
                cur._iter = iter(cur.source.documents(cur._next))
            try:
                doc = next(cur._iter)
            except StopIteration:
                cur._iter = None
                if cur._next == 0 or wrapped:
                    if not docs:
                        raise DataError(f"data source {cur.source.name!r} has no documents") from None
                    break
                cur._next = 0  # next epoch
                wrapped = True
                continue
            except DataError as exc:  # raised when this document is drawn, not before
                self._tokenize_into(cur, docs)
                cur._queue.append((cur._next, exc))
                cur._iter = None
                return
            docs.append((cur._next, doc))
            cur._next += 1
            wrapped = False
        self._tokenize_into(cur, docs)

    def _tokenize_into(self, cur: _Cursor, docs: list[tuple[int, Document]]) -> None:
        """Queue ``docs`` tokenized; a document that cannot be used queues its error instead."""
        entries: list[tuple[int, array | BaseException]] = []
        texts: list[str] = []
        slots: list[int] = []
        for index, doc in docs:
            if self.chat:
                entries.append((index, self._encode_conversation(cur, doc)))
                continue
            if doc.messages is not None:
                entries.append((index, DataError(
                    f"data source {cur.source.name!r}: document {doc.id} is a chat record (messages); "
                    "LM stages (pretrain, midtrain) take text documents"
                )))
                continue
            if doc.tokens is not None:
                entries.append((index, _token_array(doc.tokens, self.eos_id)))
                continue
            if not isinstance(doc.text, str):
                entries.append((index, DataError(f"data source {cur.source.name!r}: document {doc.id} has no text")))
                continue
            slots.append(len(entries))
            entries.append((index, array("q")))
            texts.append(doc.text)
        if texts:
            if self._encode_batch is not None:
                encoded = self._encode_batch(texts)
            else:
                encoded = [self.tokenizer.encode(t) for t in texts]
            eos = self.eos_id
            for slot, ids in zip(slots, encoded):
                tokens = array("q", ids)
                tokens.append(eos)
                entries[slot] = (entries[slot][0], tokens)
        cur._queue.extend(entries)

    def _encode_conversation(self, cur: _Cursor, doc: Document) -> tuple[array, array] | DataError:
        """ChatML ids and the assistant-token mask, closed by EOS (a packing boundary, no target)."""
        if doc.messages is None:
            return DataError(
                f"data source {cur.source.name!r}: document {doc.id} is plain text; chat stages (sft) "
                "take chat records (messages)"
            )
        ids, mask = self.tokenizer.encode_chat(list(doc.messages))
        tokens = array("q", ids)
        tokens.append(self.eos_id)
        targets = array("b", mask)
        targets.append(0)
        return tokens, targets

    def _draw(self) -> None:
        """Append the next document (by deficit) to the token stream and update the counters."""
        cur = self._cursors[self._pick()]
        if not cur._queue:
            self._refill(cur)
        index, ids = cur._queue.popleft()
        if isinstance(ids, BaseException):
            cur._queue.appendleft((index, ids))
            raise ids
        if isinstance(ids, tuple):
            ids, mask = ids
            self._mask.extend(mask)
        if index != cur.position:  # the reader wrapped around to 0: a new epoch begins
            cur.epoch += 1
        cur.position = index + 1
        n = len(ids)
        cur.tokens += n
        cur.documents += 1
        if cur.epoch == 0:
            cur.unique_tokens += n
        self._total_tokens += n
        self._buffer.extend(ids)

    # -- batches ------------------------------------------------------------------------------

    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        chunk = self.seq_len + 1
        world, rank = self.dp_world_size, self.dp_rank
        need = chunk * self.batch_size * world
        while len(self._buffer) < need:
            self._draw()
        mine = self._take(self._buffer, need, chunk, "q")
        data = torch.frombuffer(mine, dtype=torch.int64).view(self.batch_size, chunk)
        inputs, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        if self.chat:
            targets = torch.frombuffer(self._take(self._mask, need, chunk, "b"), dtype=torch.int8).view(self.batch_size, chunk)
            labels[targets[:, 1:] == 0] = IGNORE_INDEX
        self._samples += self.batch_size * world
        # Per-document positions: the model attends within each packed document only.
        return {"input": inputs, "positions": document_positions(inputs, self.eos_id)}, labels

    def _take(self, buf: array, need: int, chunk: int, typecode: str) -> array:
        """Cut this rank's samples (global sample k goes to rank k % world) off ``buf``."""
        world, rank = self.dp_world_size, self.dp_rank
        if world == 1:
            mine = buf[:need]
        else:
            mine = array(typecode)
            for j in range(self.batch_size):
                k = j * world + rank
                mine += buf[k * chunk:(k + 1) * chunk]
        del buf[:need]
        return mine

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        c = self._cursors
        return {
            "version": _STATE_VERSION,
            "num_sources": len(c),
            "dp_world_size": self.dp_world_size,
            "samples": self._samples,
            "total_tokens": self._total_tokens,
            "positions": [x.position for x in c],
            "epochs": [x.epoch for x in c],
            "tokens": [x.tokens for x in c],
            "documents": [x.documents for x in c],
            "unique_tokens": [x.unique_tokens for x in c],
            "buffer": self._buffer.tolist(),
            "mask": self._mask.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {_STATE_VERSION}")
        if int(state["num_sources"]) != len(self._cursors):
            raise DataError(
                f"data loader state has {int(state['num_sources'])} sources, this mixture has {len(self._cursors)}"
            )
        # The state is global (every rank holds the same one), so a different data-parallel
        # degree continues the same global sample sequence: each global batch is the same set
        # of samples, only split differently (``state["dp_world_size"]`` is informational).
        for i, cur in enumerate(self._cursors):
            cur.position = int(state["positions"][i])
            cur.epoch = int(state["epochs"][i])
            cur.tokens = int(state["tokens"][i])
            cur.documents = int(state["documents"][i])
            cur.unique_tokens = int(state["unique_tokens"][i])
            cur.reset_reader()
        self._samples = int(state["samples"])
        self._total_tokens = int(state["total_tokens"])
        buffer = state["buffer"]
        self._buffer = array("q", [int(t) for t in buffer])
        self._mask = array("b", [int(t) for t in state.get("mask", [])])

    # -- reporting ----------------------------------------------------------------------------

    @property
    def samples(self) -> int:
        """Global samples cut so far (all ranks together)."""
        return self._samples

    def reports(self) -> dict[str, Any]:
        """Each source's own ``report()`` (bad-input counts, decontamination…), by source name."""
        return {c.source.name: c.source.report() for c in self._cursors if hasattr(c.source, "report")}

    def stats(self) -> list[dict[str, Any]]:
        """Per source: name, weight (target share), tokens and documents drawn, unique, epochs."""
        out = []
        for w, cur in zip(self.weights, self._cursors):
            n = _length(cur.source)
            out.append({
                "name": cur.source.name,
                "weight": w,
                "tokens": cur.tokens,
                "documents": cur.documents,
                "unique_documents": min(cur.documents, n) if n is not None else cur.documents,
                "unique_tokens": cur.unique_tokens,
                "epochs": cur.documents / n if n else float(cur.epoch),
            })
        return out

    def table(self) -> str:
        """The recipe's table: source, share (target), drawn share, tokens, unique tokens, epochs."""
        rows = [("source", "share", "drawn", "tokens", "unique", "epochs")]
        total = max(self._total_tokens, 1)
        for s in self.stats():
            rows.append((
                str(s["name"]), f"{100 * s['weight']:.1f}%", f"{100 * s['tokens'] / total:.1f}%",
                _human(s["tokens"]), _human(s["unique_tokens"]), f"{s['epochs']:.2f}",
            ))
        rows.append(("total", "100.0%", "100.0%", _human(self._total_tokens),
                     _human(sum(c.unique_tokens for c in self._cursors)), ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, r in enumerate(rows):
            cells = [r[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(r) if i > 0]
            lines.append("  ".join(cells).rstrip())
            if j == 0 or j == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _token_array(tokens: Any, eos: int) -> array:
    """``tokens + [eos]`` as ``array("q")``; a numpy array converts in one copy, not per token."""
    out = array("q")
    if hasattr(tokens, "astype"):
        out.frombytes(tokens.astype("=i8", copy=False).tobytes())
    else:
        out.extend(tokens)
    out.append(eos)
    return out


def _human(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
