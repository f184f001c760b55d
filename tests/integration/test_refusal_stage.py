"""The refusal stage end to end on a small model: sampled P(correct) → SFT records and
first-token DPO pairs → SFT phase → DPO phase, with SimpleQA-style rates before and after."""

from __future__ import annotations

import json

import orjson
import pytest

from phi4_engine.engine import Engine
from phi4_engine.plugins.synthetic import SyntheticSource
from phi4_engine.plugins.synthetic_refusal import REFUSAL_PREFIX
from tests.conftest import write_spec

pytestmark = pytest.mark.slow

REFUSAL = {"kind": "synthetic-refusal", "format": "chat"}


def test_bogus_questions_and_their_twins():
    source = SyntheticSource("synthetic-refusal", seed=0, num_documents=200, format="chat",
                             options={"share_bogus": 0.5, "operations": (1, 1), "max_operand": 20})
    docs = list(source.documents())
    bogus = [d for d in docs if d.meta["bogus"]]
    assert 70 < len(bogus) < 130
    assert {d.meta["bogus_kind"] for d in bogus} == {"missing-quantity", "division-by-zero", "nonexistent"}
    for d in docs:
        answer = d.messages[1]["content"]
        assert answer.startswith(REFUSAL_PREFIX) == d.meta["bogus"]
        assert (d.meta["answer"] is None) == d.meta["bogus"]
    assert [d.messages for d in source.documents()] == [d.messages for d in docs]  # deterministic


@pytest.fixture(scope="module")
def refusal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusal")
    data = {
        "version": 1, "name": "refusal-test", "seed": 0,
        "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "checkpoint": {"interval": 100, "keep_latest_k": 2},
        "stages": [
            {"kind": "sft", "steps": 15, "seq_len": 256, "batch_size": 4, "lr": 0.003,
             "data": {"sources": [{**REFUSAL, "name": "chat", "num_documents": 300, "share_bogus": 0.0}]}},
            {"kind": "refusal", "questions": [{**REFUSAL, "name": "questions", "num_documents": 40}],
             "num_questions": 24, "samples": 2, "max_new_tokens": 24,
             "sft": {"steps": 6, "lr": 0.003, "batch_size": 4, "seq_len": 256},
             "dpo": {"pairs": 8, "lr": 1e-4, "batch_size": 4, "seq_len": 128, "first_tokens": 5},
             "evaluations": [{"kind": "refusal-rates", "name": "rates", "problems": 10, "max_new_tokens": 24,
                              "source": {**REFUSAL, "name": "heldout", "num_documents": 20}}]},
        ],
    }  # fmt: skip
    spec = write_spec(tmp / "spec.json", data)
    result = Engine.from_file(spec, run_dir=tmp / "run").run()
    return result, tmp / "run"


def test_phases_run_in_order_from_the_previous_stage(refusal_run):
    result, run_dir = refusal_run
    summary, sft = result.stages["refusal"].summary, result.stages["sft"].summary
    assert summary["init_weights_sha256"] == sft["weights_sha256"]
    sft_phase, dpo_phase = summary["phases"]
    assert (sft_phase["phase"], sft_phase["steps"], dpo_phase["phase"], dpo_phase["steps"]) == ("sft", 6, "dpo", 2)
    assert summary["steps"] == 8
    assert summary["final_checkpoint"].startswith(str(run_dir / "refusal" / "dpo" / "checkpoints"))
    assert (run_dir / "refusal" / "sft" / "metrics.jsonl").exists() and (run_dir / "refusal" / "dpo" / "metrics.jsonl").exists()


def test_sft_records_and_first_token_pairs_follow_the_paper(refusal_run):
    _, run_dir = refusal_run
    data = run_dir / "refusal" / "data"
    records = [orjson.loads(l) for l in (data / "sft-records.jsonl").read_bytes().splitlines()]
    assert len(records) == 24
    for r in records:
        question, answer = r["messages"][0]["content"], r["messages"][-1]["content"]
        if "p_correct" not in r:  # bogus: always the refusal
            assert answer.startswith(REFUSAL_PREFIX)
        elif r["p_correct"] < 0.5:
            assert answer == "I cannot answer this reliably."
        else:
            assert not answer.startswith(REFUSAL_PREFIX)
    pairs = [orjson.loads(l) for l in (data / "pairs.jsonl").read_bytes().splitlines()]
    assert 0 < len(pairs) <= 8
    for p in pairs:
        assert p["score_first"] == 5
        refusal_side = "chosen_text" if p["kind"] != "correct_over_refusal" else "rejected_text"
        assert p[refusal_side].startswith(REFUSAL_PREFIX)


def test_rates_are_reported_before_and_after(refusal_run):
    _, run_dir = refusal_run
    evals = json.loads((run_dir / "refusal" / "eval.json").read_text())
    for label in ("before", "after"):
        rates = evals[label]["rates"]
        assert rates["bogus"] + rates["answerable"] == 10
        assert rates["bogus_not_attempted"] + rates["bogus_incorrect"] == pytest.approx(1)
        total = rates["answerable_correct"] + rates["answerable_incorrect"] + rates["answerable_not_attempted"]
        assert total == pytest.approx(1)
