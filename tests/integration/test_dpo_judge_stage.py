"""The dpo-judge stage end to end on a small model: candidates → judge → pairs → DPO.

A short sft stage provides the starting weights. A third-party judge plugin (registered on the
Engine like any plugin) wraps the built-in ``rule`` judge, counts what it is asked, and can crash
the run part-way, so the tests can show that a resumed stage never asks for a verdict twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import orjson
import pytest

from phi4_engine import hookimpl
from phi4_engine.engine import Engine
from phi4_engine.errors import EngineError
from phi4_engine.judging import BaseJudge, prefer, Verdict
from phi4_engine.plugins.judges import RuleJudge, RuleJudgeSpec
from phi4_engine.spec.base import SpecModel
from tests.conftest import write_spec

pytestmark = pytest.mark.slow

ARITH = {"kind": "synthetic-arithmetic", "format": "chat", "operations": [1, 1], "max_operand": 20}


class Crash(BaseException):
    """Not an Exception: judges turn exceptions into failures, this one must stop the run."""


class CountingSpec(SpecModel):
    kind: Literal["counting"]


class CountingJudge(BaseJudge):
    name, version = "counting", "1"
    asked: list[str] = []  # class-level: survives the engine being rebuilt
    crash_after = -1  # class-level too: the spec must not change between a run and its resume

    def __init__(self, spec: CountingSpec) -> None:
        self.inner = RuleJudge(RuleJudgeSpec(kind="rule"))

    def score(self, prompt, response, *, reference=None) -> Verdict:
        if 0 <= self.crash_after <= len(CountingJudge.asked):
            raise Crash()
        CountingJudge.asked.append(response)
        v = self.inner.score(prompt, response, reference=reference)
        return self.verdict(v.scores, v.raw)


class CountingPlugin:
    @hookimpl
    def phi4_register_judges(self, register):
        register("counting", CountingSpec, CountingJudge)


def _spec(judge: dict, *, pairs: int = 6) -> dict:
    return {
        "version": 1, "name": "dpo-judge-test", "seed": 0,
        "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "checkpoint": {"interval": 100, "keep_latest_k": 2},
        "stages": [
            {"kind": "sft", "steps": 15, "seq_len": 256, "batch_size": 4, "lr": 0.003,
             "data": {"sources": [{**ARITH, "name": "chat", "num_documents": 300}]}},
            {"kind": "dpo-judge", "pairs": pairs, "candidates": 2, "prompts_per_batch": 4,
             "max_new_tokens": 32, "seq_len": 160, "batch_size": 3, "lr": 1e-4, "judge": judge,
             "loss": {"kind": "dpo-sigmoid", "beta": 0.1},
             "prompts": [{**ARITH, "name": "prompts", "num_documents": 40}],
             "evaluations": [{"kind": "judge-score", "name": "judged", "problems": 6, "max_new_tokens": 32,
                              "source": {**ARITH, "name": "heldout", "num_documents": 30}}]},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo-judge")
    spec = write_spec(tmp / "spec.json", _spec({"kind": "counting"}))
    CountingJudge.asked, CountingJudge.crash_after = [], 5
    with pytest.raises(Crash):
        Engine.from_file(spec, run_dir=tmp / "run", plugins=[CountingPlugin()]).run()
    before_crash = list(CountingJudge.asked)
    CountingJudge.crash_after = -1  # same run, same spec, the judge healthy now
    result = Engine.from_file(spec, run_dir=tmp / "run", plugins=[CountingPlugin()]).run()
    return result, tmp / "run", before_crash, list(CountingJudge.asked)


def test_pairs_follow_the_judges_preference(judged_run):
    result, run_dir, _, _ = judged_run
    stage = result.stages["dpo-judge"]
    assert stage.status == "done"
    lines = (run_dir / "dpo-judge" / "data" / "pairs.jsonl").read_bytes().splitlines()
    pairs = [orjson.loads(l) for l in lines]
    assert len(pairs) == 6 == stage.summary["pairs"]
    for p in pairs:
        chosen = Verdict(p["chosen_scores"], "rule", "1")
        rejected = Verdict(p["rejected_scores"], "rule", "1")
        assert prefer(chosen, rejected) == 1
        assert p["chosen_ids"] != p["rejected_ids"]
    report = stage.summary["pair_building"]
    assert report["pairs"] == 6 and report["judge"]["name"] == "counting"


def test_starts_from_sft_and_caches_reference_logps(judged_run):
    result, run_dir, _, _ = judged_run
    dpo, sft = result.stages["dpo-judge"].summary, result.stages["sft"].summary
    assert dpo["init_weights_sha256"] == sft["weights_sha256"]
    assert dpo["weights_sha256"] != sft["weights_sha256"]
    cached = list((run_dir / "dpo-judge" / "data").glob("ref-logps-*.json"))
    assert len(cached) == 1
    record = orjson.loads(cached[0].read_bytes())
    assert record["init_weights_sha256"] == sft["weights_sha256"] and len(record["logps"]) == 6
    assert dpo["steps"] == 2  # 6 pairs, batch 3, one epoch


def test_resume_never_asks_the_judge_twice(judged_run):
    _, run_dir, before_crash, asked = judged_run
    assert len(before_crash) == 5  # the first run died part-way through judging
    verdicts = (run_dir / "dpo-judge" / "data" / "verdicts.jsonl").read_bytes().splitlines()
    assert len(verdicts) == len(set(asked)) == len(asked)  # every verdict asked exactly once


def test_judge_score_evaluation_before_and_after(judged_run):
    _, run_dir, _, _ = judged_run
    evals = json.loads((run_dir / "dpo-judge" / "eval.json").read_text())
    for label in ("before", "after"):
        scores = evals[label]["judged"]
        assert scores["judged"] + scores["failed"] == 6
        assert 1 <= scores["mean"] <= 5 and 1 <= scores["accuracy"] <= 5


def test_every_judgment_failing_is_an_error_not_a_score(tmp_path):
    class AlwaysMalformed:
        @hookimpl
        def phi4_register_judges(self, register):
            class Bad(BaseJudge):
                name, version = "bad", "0"

                def __init__(self, spec):
                    pass

                def score(self, prompt, response, *, reference=None):
                    raise self.failure("malformed", "no JSON here", raw="I think it is fine")

            class BadSpec(SpecModel):
                kind: Literal["bad"]

            register("bad", BadSpec, Bad)

    data = _spec({"kind": "bad"}, pairs=2)
    data["stages"][1].pop("evaluations")
    spec = write_spec(tmp_path / "spec.json", data)
    with pytest.raises(EngineError, match="every judgment failed"):
        Engine.from_file(spec, run_dir=tmp_path / "run", plugins=[AlwaysMalformed()]).run()
    quarantine = (tmp_path / "run" / "dpo-judge" / "data" / "judge-quarantine.jsonl").read_bytes().splitlines()
    assert quarantine and all(orjson.loads(q)["raw"] == "I think it is fine" for q in quarantine)
    assert not (tmp_path / "run" / "dpo-judge" / "data" / "pairs.jsonl").exists()
