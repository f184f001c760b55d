"""A pretrain run with a skip-policy JSONL source and a decontamination section, end to end."""

from __future__ import annotations

import orjson

from phi4_engine.engine import Engine
from tests.conftest import tiny_pretrain_spec, write_spec

BENCH = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def test_pretrain_writes_quarantine_and_decontamination_report(tmp_path):
    lines = [orjson.dumps({"text": f"story {i}: the quick brown fox jumps over the lazy dog number {i}."}) for i in range(200)]
    lines[17] = b'{"text": "cut'
    lines[40] = orjson.dumps({"text": f"homework: {BENCH.upper()} how many?"})
    (tmp_path / "web.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "gsm.jsonl").write_bytes(orjson.dumps({"question": BENCH}) + b"\n")
    data = tiny_pretrain_spec(steps=3)
    data["stages"][0]["data"] = {
        "sources": [{"kind": "jsonl", "name": "web", "path": "web.jsonl", "on_error": "skip"}],
        "decontamination": {"benchmarks": ["gsm.jsonl"], "field": "question"},
    }
    run = tmp_path / "run"
    Engine.from_file(write_spec(tmp_path / "spec.json", data), run_dir=run).run()
    quarantine = [orjson.loads(line) for line in (run / "pretrain" / "data" / "quarantine" / "web.jsonl").read_bytes().splitlines()]
    assert [(q["line"], q["raw"]) for q in quarantine] == [(18, '{"text": "cut')]
    report = orjson.loads((run / "pretrain" / "data" / "decontamination.json").read_bytes())
    web = report["sources"]["web"]
    assert (web["scanned"], web["kept"], web["dropped"]) == (199, 198, {"ngram": 1, "ratio": 0})
    assert web["examples"]["ngram"] == [{"id": "web.jsonl:41", "item": "gsm.jsonl:1", "ratio": None}]
    ledger = orjson.loads((run / "ledger.json").read_bytes())
    assert ledger["stages"]["pretrain"]["data_reports"]["web"]["dropped"] == {"ngram": 1, "ratio": 0}
