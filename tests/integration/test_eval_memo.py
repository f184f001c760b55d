"""An evaluation of the same weights is computed once per run: a stage's "before" is the
previous stage's "after", read from ``<run>/eval-memo/``."""

from __future__ import annotations

import json

import orjson

from phi4_engine.engine import Engine
from tests.conftest import tiny_pretrain_spec, write_spec

HELDOUT = {"kind": "heldout-loss", "name": "heldout", "source": {"kind": "synthetic-prose", "name": "held"},
           "lengths": [32], "sequences": 2}  # fmt: skip


def test_before_is_the_previous_after_read_from_the_memo(tmp_path):
    data = tiny_pretrain_spec(steps=3, evaluations=[HELDOUT])
    data["stages"].append({**data["stages"][0], "name": "more", "steps": 2})
    spec = write_spec(tmp_path / "spec.json", data)
    run = tmp_path / "run"
    Engine.from_file(spec, run_dir=run).run(["pretrain"])
    [memo] = (run / "eval-memo").iterdir()
    computed = orjson.loads(memo.read_bytes())
    memo.write_bytes(orjson.dumps({"loss@32": 123.0}))  # a marker: read back, not recomputed

    Engine.from_file(spec, run_dir=run).run()
    before = json.loads((run / "more" / "eval.json").read_text())["before"]["heldout"]
    after = json.loads((run / "more" / "eval.json").read_text())["after"]["heldout"]
    assert before == {"loss@32": 123.0}
    assert after["loss@32"] != computed["loss@32"]  # other weights: computed, and memoized too
    assert len(list((run / "eval-memo").iterdir())) == 2


def test_a_changed_evaluation_is_not_taken_from_the_memo(tmp_path):
    data = tiny_pretrain_spec(steps=3, evaluations=[HELDOUT])
    data["stages"].append({**data["stages"][0], "name": "more", "steps": 2,
                           "evaluations": [{**HELDOUT, "sequences": 3}]})  # fmt: skip
    spec = write_spec(tmp_path / "spec.json", data)
    run = tmp_path / "run"
    Engine.from_file(spec, run_dir=run).run()
    memo = {p.name for p in (run / "eval-memo").iterdir()}
    assert len(memo) == 3  # pretrain after; more before and after with the other spec
