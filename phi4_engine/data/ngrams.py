"""Word n-gram hashing for decontamination: normalized words → stable 64-bit n-gram hashes.

**Normalization.** Lowercase; every run of characters that are not letters or digits
(punctuation, ``_``, whitespace) separates words. Punctuation becomes a word *break*, not a
deletion, so ``2+2=4`` and ``2 + 2 = 4`` normalize alike (deleting it would glue ``22 4``).
Scripts without spaces (CJK) form one "word" per run; the check is made for spaced text.

**Hashing.** A word → ``sum(byte_k * B**k) + len * C`` over its UTF-8 bytes mod 2**64, then a
splitmix64 mix; an n-gram → ``sum(word_{i+k} * M**(n-1-k))`` mod 2**64. Both are computed with
numpy over a whole *batch* of documents at once: in Python, the per-word loop (and at ~1 µs
per numpy call, the per-document call count) is the cost. The values are the same in every
process (unlike ``hash()``, whose seed is random per process), so an index can be rebuilt or
shared by every rank.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_SEPARATORS = re.compile(r"[\W_]+")
_MULT = 0x9E3779B97F4A7C15  # odd multiplier of the n-gram polynomial
_POW = np.cumprod(np.concatenate([[1], np.full((1 << 16) - 1, 0x100000001B3)]).astype(np.uint64), dtype=np.uint64)
_WORD_BYTE = np.zeros(256, dtype=bool)  # a-z, 0-9, and the UTF-8 bytes of letters left by _SEPARATORS
_WORD_BYTE[list(b"abcdefghijklmnopqrstuvwxyz0123456789")] = True
_WORD_BYTE[0x80:] = True
EMPTY = np.zeros(0, dtype=np.uint64)
_NO_INDEX = np.zeros(0, dtype=np.intp)


def normalize(text: str) -> list[str]:
    """Lowercase words, punctuation and whitespace as separators (the reference definition)."""
    return _WORD.findall(text.lower())


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(hash per word, document index per word)`` for the words of :func:`normalize`, in order.

    ASCII text is split on non-[a-z0-9] bytes directly; other text first has its non-word
    characters replaced by spaces with :func:`normalize`'s regex, so the non-ASCII bytes left
    all belong to words. Documents are joined by a space, so no word spans two of them.
    """
    pieces = []
    for text in texts:
        text = text.lower()
        if not text.isascii():
            text = _SEPARATORS.sub(" ", text)
        pieces.append(text.encode())
    data = np.frombuffer(b" ".join(pieces), dtype=np.uint8)
    where = np.flatnonzero(_WORD_BYTE[data])
    if not len(where):
        return EMPTY, _NO_INDEX
    first = np.empty(len(where), dtype=bool)
    first[0] = True
    np.not_equal(where[1:] - where[:-1], 1, out=first[1:])
    starts = np.flatnonzero(first)
    lens = np.diff(np.append(starts, len(where)))
    pos = np.arange(len(where)) - np.repeat(starts, lens)
    if lens.max() > len(_POW):  # words over 64 KiB: the last power repeats (still deterministic)
        pos = np.minimum(pos, len(_POW) - 1)
    h = np.add.reduceat(data[where].astype(np.uint64) * _POW[pos], starts)
    h += lens.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
    if len(pieces) == 1:
        return _mix(h), np.zeros(len(h), dtype=np.intp)
    doc_starts = np.cumsum([0] + [len(p) + 1 for p in pieces[:-1]])
    return _mix(h), np.searchsorted(doc_starts, where[starts], side="right") - 1


def grams(ids: np.ndarray, *lengths: int) -> list[np.ndarray]:
    """Hashes of the n-grams of ``ids`` for each n in ``lengths`` (position i = words i..i+n-1).

    Built by halving (``h[a+b] = h[a] * M**b + h[b]`` shifted by ``a``) and shared between the
    lengths: the 13- and 7-grams cost ~12 array operations instead of ~36.
    """
    cache: dict[int, np.ndarray] = {1: ids}

    def get(n: int) -> np.ndarray:
        if n not in cache:
            m = len(ids) - n + 1
            if m <= 0:
                cache[n] = EMPTY
            else:
                a = n // 2
                head, tail = get(a), get(n - a)
                h = head[:m] * np.uint64(pow(_MULT, n - a, 1 << 64))
                h += tail[a:a + m]
                cache[n] = h
        return cache[n]

    return [get(n) for n in lengths]


def text_grams(text: str, *lengths: int) -> list[np.ndarray]:
    """The n-gram hashes of one text (used to build an index)."""
    return grams(word_hashes([text])[0], *lengths)


class KeySet:
    """Sorted unique 64-bit keys with a one-byte-per-slot prefilter on their top bits.

    Why: ``searchsorted`` of every n-gram costs a cache miss per query; one gather into a
    small table rejects almost every n-gram of a clean document first (~32 slots per key,
    between 2**16 and 2**25 slots).
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        bits = min(max(int(len(keys) * 32).bit_length(), 16), 25)
        self.shift = np.uint64(64 - bits)
        self.table = np.zeros(1 << bits, dtype=bool)
        self.table[(keys >> self.shift).astype(np.intp)] = True

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(indices into values, indices into keys)`` of the values that are keys."""
        if not len(self.keys) or not len(values):
            return _NO_INDEX, _NO_INDEX
        cand = np.flatnonzero(self.table[(values >> self.shift).astype(np.intp)])
        if not len(cand):
            return _NO_INDEX, _NO_INDEX
        pos = np.minimum(np.searchsorted(self.keys, values[cand]), len(self.keys) - 1)
        hit = self.keys[pos] == values[cand]
        return cand[hit], pos[hit]
