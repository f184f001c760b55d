"""Data prepare: tokenizing a corpus into shards vs raw tiktoken, and reading the shards back.

One run generates a JSONL corpus of English-like text (the synthetic prose and "academic"
generators, ~10 samples per document, ~4 KB documents; >= 50 MB, --quick ~5 MB) in a temp dir
and measures, with the Phi-4 tokenizer (cl100k + specials):

  (a) baseline: tiktoken ``encode_ordinary_batch`` on the same texts, already in memory, one
      process, ~1 MB batches, results discarded;
  (b) ours: ``phi4-engine data prepare`` (Python API) with 1 worker — reads the JSONL, tokenizes,
      writes shards and hashes them, writes the manifest (the tokenizer build is included);
  (c) ours with 2 worker processes (speed-up vs 1 worker);
  (d) reading every document's token array back through the ``shards`` source (fresh source,
      so each shard's sha256 is verified on first open; plus a pass with verify off).

Each timing is the best of ``--repeat`` rounds (the rounds interleave the contenders). Tokens/s
count text tokens (the EOS per document is not counted), the same number for every row.

    python bench/data_prepare.py [--quick] [--repeat N]

Last line: {"bench": "data_prepare", "ours": tok/s, "baseline": tok/s, "unit": "tokens/s",
"ratio": ours/baseline, "workers_2_speedup": t1/t2, "read_tokens_per_s": tok/s}
(targets: ratio >= 0.85, read >= 100M tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from phi4_engine.data.prepare import CHUNK_CHARS, prepare  # noqa: E402
from phi4_engine.data.shards import ShardSource  # noqa: E402
from phi4_engine.engine import Engine  # noqa: E402
from phi4_engine.plugins import synthetic_academic, synthetic_prose  # noqa: E402
from phi4_engine.tokenizer import build_phi4  # noqa: E402


def make_corpus(path: Path, megabytes: float) -> list[str]:
    """Write ``path`` (JSONL, one ``{"text"}`` per line) and return the texts."""
    gens = (synthetic_prose.generate, synthetic_academic.generate)
    texts, size, i = [], 0, 0
    rng = random.Random(0)
    while size < megabytes * 1e6:
        parts = [gens[(i + j) % 2](random.Random(f"bench:{i}:{j}")).text for j in range(rng.randint(4, 16))]
        text = "\n\n".join(parts)
        texts.append(text)
        size += len(text.encode())
        i += 1
    with open(path, "wb") as f:
        for text in texts:
            f.write(orjson.dumps({"text": text}) + b"\n")
    return texts


def baseline(texts: list[str]) -> tuple[float, int]:
    enc = build_phi4().encoding
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= CHUNK_CHARS:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    start = time.perf_counter()
    n = 0
    for b in batches:
        n += sum(len(ids) for ids in enc.encode_ordinary_batch(b))
    return time.perf_counter() - start, n


def spec(corpus: Path) -> dict:
    return {
        "name": "bench-prepare",
        "tokenizer": {"kind": "phi4"},
        "stages": [{
            "kind": "pretrain", "steps": 1, "seq_len": 4096, "batch_size": 1, "lr": 3e-4,
            "data": {"sources": [{"kind": "jsonl", "name": "corpus", "path": str(corpus)}]},
        }],
    }  # fmt: skip


def ours(corpus: Path, out: Path, workers: int) -> tuple[float, dict]:
    engine = Engine(spec(corpus), base_dir=corpus.parent)
    engine.validate()
    start = time.perf_counter()
    manifest = prepare(engine, out, workers=workers, force=True, progress=False)
    return time.perf_counter() - start, manifest


def read(out: Path, verify: bool) -> tuple[float, int]:
    start = time.perf_counter()
    source = ShardSource(out, "corpus", verify=verify)
    n = 0
    for doc in source.documents():
        n += len(doc.tokens)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~5 MB corpus, one round")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per measurement (default 3, --quick 1)")
    args = parser.parse_args()
    megabytes = 5 if args.quick else 52
    rounds = args.repeat or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        texts = make_corpus(corpus, megabytes)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {len(texts):,} documents, {mb:.1f} MB JSONL (generated in {time.perf_counter() - t0:.1f} s)")
        times: dict[str, list[float]] = {"baseline": [], "w1": [], "w2": [], "read": [], "read_noverify": []}
        tokens = None
        for r in range(rounds):
            t, tokens = baseline(texts)
            times["baseline"].append(t)
            for workers, key in ((1, "w1"), (2, "w2")):
                t, manifest = ours(corpus, Path(tmp) / f"shards-{workers}", workers)
                times[key].append(t)
                src = manifest["sources"][0]
                assert src["tokens"] - src["documents"] == tokens, (src["tokens"], src["documents"], tokens)
            for verify, key in ((True, "read"), (False, "read_noverify")):
                t, n = read(Path(tmp) / "shards-1", verify)
                assert n == tokens
                times[key].append(t)
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
        a, b = (Path(tmp) / "shards-1", Path(tmp) / "shards-2")
        identical = all((a / f).read_bytes() == (b / f).read_bytes() for f in os.listdir(a))
    best = {k: min(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in best.items()}
    rows = [
        ("(a) tiktoken encode_ordinary_batch, 1 process (baseline)", "baseline"),
        ("(b) data prepare, 1 worker (JSONL -> shards + manifest)", "w1"),
        ("(c) data prepare, 2 workers", "w2"),
        ("(d) read shards source (sha256 verified on first open)", "read"),
        ("    read shards source (verify: false)", "read_noverify"),
    ]
    print(f"\n{tokens:,} tokens ({mb:.1f} MB JSONL), best of {rounds}; shards identical for 1 and 2 workers: {identical}")
    print(f"{'':58} {'seconds':>8} {'M tok/s':>9} {'MB/s':>7}")
    for label, key in rows:
        print(f"{label:58} {best[key]:8.3f} {tps[key] / 1e6:9.2f} {mb / best[key]:7.1f}")
    ratio = tps["w1"] / tps["baseline"]
    speedup = best["w1"] / best["w2"]
    print(f"ratio (b)/(a) {ratio:.3f} (target >= 0.85); 2-worker speed-up {speedup:.2f}x; "
          f"read {tps['read'] / 1e6:.0f}M tok/s (target >= 100M)")
    print(json.dumps({
        "bench": "data_prepare", "ours": round(tps["w1"]), "baseline": round(tps["baseline"]), "unit": "tokens/s",
        "ratio": round(ratio, 3), "workers_2_speedup": round(speedup, 3), "read_tokens_per_s": round(tps["read"]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
