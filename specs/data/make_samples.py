"""Write the small sample files that specs/full.json points at (run from the repo root).

They stand in for your corpus so that full.json validates and can be smoke-run: a few dozen
records per source, made by the built-in synthetic generators, compressed with zstd. Replace the
paths (in a spec that extends full.json, or with --set) with your own data.

    python specs/data/make_samples.py
"""

from __future__ import annotations

from pathlib import Path

import orjson
import zstandard

from phi4_engine.data.source import SourceContext
from phi4_engine.engine import Engine

HERE = Path(__file__).resolve().parent

SAMPLES = {
    "web.jsonl.zst": ({"kind": "synthetic-prose"}, "text"),
    "web-rewrites.jsonl.zst": ({"kind": "synthetic-academic"}, "text"),
    "synthetic.jsonl.zst": ({"kind": "synthetic-arithmetic"}, "text"),
    "code.jsonl.zst": ({"kind": "synthetic-code"}, "text"),
    "acquired.jsonl.zst": ({"kind": "synthetic-academic"}, "text"),
    "long.jsonl.zst": ({"kind": "synthetic-academic"}, "long"),
    "chat.jsonl.zst": ({"kind": "synthetic-arithmetic", "format": "chat"}, "messages"),
    "tasks.jsonl.zst": ({"kind": "synthetic-arithmetic", "format": "chat"}, "messages"),
    # refusal questions: bogus ones and answerable twins, meta (bogus, answer…) as record fields
    "trivia.jsonl.zst": ({"kind": "synthetic-refusal", "format": "chat"}, "messages+meta"),
}


def main() -> None:
    engine = Engine({"name": "samples", "stages": []})
    ctx = SourceContext(base_dir=str(HERE), seed=1234)
    for filename, (source_spec, shape) in SAMPLES.items():
        reg = engine.registry.get("data_source", source_spec["kind"])
        source = reg.factory(reg.spec_model.model_validate({**source_spec, "num_documents": 64}), ctx)
        docs = list(source.documents())
        if shape == "long":  # long documents: many paragraphs joined
            records = [{"text": "\n\n".join(d.text for d in docs[i : i + 16])} for i in range(0, 64, 16)]
        elif shape == "messages":
            records = [{"messages": list(d.messages), "answer": (d.meta or {}).get("answer")} for d in docs]
        elif shape == "messages+meta":
            records = [{"messages": list(d.messages), **(d.meta or {})} for d in docs]
        else:
            records = [{"text": d.text} for d in docs]
        raw = b"".join(orjson.dumps(r) + b"\n" for r in records)
        (HERE / filename).write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))
        print(f"{filename}: {len(records)} records")


if __name__ == "__main__":
    main()
