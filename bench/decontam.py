"""Decontamination throughput: DecontaminationIndex vs the textbook Alg. 1 in plain Python.

Synthetic English-like text (Zipf-distributed words with punctuation, ~3 KB documents, ~10 MB;
2% of documents embed a benchmark item, 1% are short fragments of one) is checked against
~1000 synthetic benchmark items. Ours: hashed n-grams, numpy, an inverted 7-gram index. The
baseline: the same normalization, n-grams as tuples in Python sets, and the ratio computed
against every item (O(items) per document) — run on a slice of the corpus, since it is slow.
Both classify the same slice; their verdicts must agree (checked).

    python bench/decontam.py [--quick]

Last line: {"bench": "decontam", "ours": docs/s, "baseline": docs/s, "unit": "docs/s", "ratio": ours/baseline, ...}
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi4_engine.data.decontam import DecontaminationIndex  # noqa: E402
from phi4_engine.data.ngrams import normalize  # noqa: E402


def corpus(mb: float, items: int, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30_000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))

    def sentence(n: int) -> str:
        words = rng.choices(vocab, cum_weights=cum, k=n)
        return " ".join(words).capitalize() + rng.choice([".", "?", "!", ";"])

    bench = [(f"bench:{j}", " ".join(sentence(rng.randint(8, 15)) for _ in range(3))) for j in range(items)]
    docs, size = [], 0
    while size < mb * 1e6:
        text = " ".join(sentence(rng.randint(5, 25)) for _ in range(rng.randint(15, 40)))
        u = rng.random()
        if u < 0.02:
            text += " " + rng.choice(bench)[1].upper()
        elif u < 0.03:
            text = " ".join(normalize(rng.choice(bench)[1])[:12])
        docs.append(text)
        size += len(text.encode())
    return docs, bench


class Naive:
    """Alg. 1 as written: sets of word tuples, ratio against every item."""

    def __init__(self, items: list[tuple[str, str]], n: int = 13, r: int = 7, info: float = 0.5, cont: float = 0.8):
        self.n, self.r, self.info, self.cont = n, r, info, cont
        self.long = set()
        self.items = []
        for _, text in items:
            words = normalize(text)
            self.long |= self._grams(words, n)
            self.items.append(self._grams(words, r))

    @staticmethod
    def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    def check(self, text: str) -> str:
        words = normalize(text)
        if self._grams(words, self.n) & self.long:
            return "contaminated"
        doc = self._grams(words, self.r)
        best = max((len(doc & g) / min(len(doc), len(g)) for g in self.items if g and doc), default=0.0)
        if best > self.info:
            return "contaminated" if best >= self.cont else "partial"
        return "clean"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    mb, items, slice_docs = (2.0, 300, 150) if args.quick else (10.0, 1000, 400)
    docs, bench = corpus(mb, items)
    total_mb = sum(len(d.encode()) for d in docs) / 1e6

    t0 = time.perf_counter()
    index = DecontaminationIndex(bench)
    build_s = time.perf_counter() - t0
    def run(texts: list[str]) -> list[str]:  # batches, as DecontaminatedSource scans a source
        return [v.status for i in range(0, len(texts), 256) for v in index.check_many(texts[i:i + 256])]

    t0 = time.perf_counter()
    ours = run(docs)
    ours_s = time.perf_counter() - t0

    naive = Naive(bench)
    sample = docs[:slice_docs]
    t0 = time.perf_counter()
    base = [naive.check(d) for d in sample]
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_slice = run(sample)
    ours_slice_s = time.perf_counter() - t0
    agree = base == ours_slice
    sample_mb = sum(len(d.encode()) for d in sample) / 1e6

    dropped = sum(s == "contaminated" for s in ours)
    rows = [
        ("", "docs", "MB", "seconds", "docs/s", "MB/s"),
        ("ours (all)", len(docs), f"{total_mb:.1f}", f"{ours_s:.2f}", f"{len(docs) / ours_s:.0f}", f"{total_mb / ours_s:.2f}"),
        ("ours (slice)", len(sample), f"{sample_mb:.1f}", f"{ours_slice_s:.2f}", f"{len(sample) / ours_slice_s:.0f}",
         f"{sample_mb / ours_slice_s:.2f}"),
        ("baseline (slice)", len(sample), f"{sample_mb:.1f}", f"{base_s:.2f}", f"{len(sample) / base_s:.0f}",
         f"{sample_mb / base_s:.2f}"),
    ]
    for row in rows:
        print("  ".join(str(c).rjust(16 if i == 0 else 9) for i, c in enumerate(row)))
    print(f"index of {items} items built in {build_s:.2f}s; dropped {dropped}/{len(docs)}; verdicts agree on slice: {agree}")
    ours_rate, base_rate = len(sample) / ours_slice_s, len(sample) / base_s
    print(json.dumps({
        "bench": "decontam", "ours": round(ours_rate, 1), "baseline": round(base_rate, 1), "unit": "docs/s",
        "ratio": round(ours_rate / base_rate, 2), "ours_all_docs_per_s": round(len(docs) / ours_s, 1),
        "ours_all_mb_per_s": round(total_mb / ours_s, 2), "items": items, "mb": round(total_mb, 1), "agree": agree,
    }))


if __name__ == "__main__":
    main()
