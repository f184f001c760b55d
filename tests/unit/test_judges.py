"""Judges: the rule judge's rubric, the preference rule, and the verdict cache (resume, quarantine)."""

from __future__ import annotations

import json
import random
import threading

import pytest

from phi4_engine.errors import DataError
from phi4_engine.judging import (BaseJudge, Judge, JudgeFailure, JudgeItem, Verdict, VerdictCache, prefer,
                                 verdict_key)
from phi4_engine.manager import PluginHost
from phi4_engine.plugins import synthetic_arithmetic
from phi4_engine.plugins.judges import OpenAIChatSpec, RuleJudge, RuleJudgeSpec, parse_scores

META = {"question": "Compute 19 - 15 + 27.", "answer": "31", "expression": "19 - 15 + 27"}
RIGHT = "19 - 15 = 4\n4 + 27 = 31\nAnswer: 31"


@pytest.fixture()
def rule() -> RuleJudge:
    return RuleJudge(RuleJudgeSpec(kind="rule"))


def v(accuracy: float, style: float, detail: float) -> Verdict:
    return Verdict({"accuracy": accuracy, "style": style, "detail": detail}, "t", "1")


# --- rule judge -----------------------------------------------------------------------------


def test_rule_judge_right_answer_with_steps_scores_full(rule):
    verdict = rule.score(META["question"], RIGHT, reference=META)
    assert verdict.scores == {"accuracy": 5.0, "style": 5.0, "detail": 5.0}
    assert (verdict.judge, verdict.judge_version) == ("rule", "rule-1")


def test_rule_judge_every_generated_solution_scores_full(rule):
    for i in range(50):
        sample = synthetic_arithmetic.generate(random.Random(i))
        assert rule.score(sample.prompt, sample.response, reference=sample.meta).mean == 5.0, sample


def test_rule_judge_wrong_answer(rule):
    verdict = rule.score(META["question"], "19 - 15 = 4\n4 + 27 = 31\nAnswer: 32", reference=META)
    assert verdict.scores["accuracy"] == 1.0
    assert verdict.scores["detail"] == 5.0  # the steps shown are still true


def test_rule_judge_stepless_and_false_steps(rule):
    bare = rule.score(META["question"], "Answer: 31", reference=META)
    assert bare.scores == {"accuracy": 5.0, "style": 5.0, "detail": 1.0}
    half = rule.score(META["question"], "19 - 15 = 4\nAnswer: 31", reference=META)
    assert half.scores["detail"] == 3.0
    lying = rule.score(META["question"], "19 - 15 = 5\n4 + 27 = 31\nAnswer: 31", reference=META)
    assert lying.scores["detail"] < half.scores["detail"]


def test_rule_judge_style(rule):
    no_final = rule.score(META["question"], "Answer: 31\n19 - 15 = 4\n4 + 27 = 31", reference=META)
    assert no_final.scores["style"] == 3.0 and no_final.scores["accuracy"] == 5.0
    repeats = rule.score(META["question"], RIGHT.replace("Answer", "So\nSo\nAnswer") + "\nAnswer: 31", reference=META)
    assert repeats.scores["style"] == 3.0  # a repeated line, two Answer: lines
    filler = "".join(f"Let me think about step {i}.\n" for i in range(8))
    rambling = rule.score(META["question"], filler + RIGHT, reference=META)
    assert rambling.scores["style"] == 4.0 and rambling.scores["accuracy"] == 5.0
    meta = {"answer": "539", "expression": "((77 * 7) // 7) * 7"}
    recurring = rule.score("q", "77 × 7 = 539\n539 ÷ 7 = 77\n77 × 7 = 539\nAnswer: 539", reference=meta)
    assert recurring.mean == 5.0  # the same step twice is legitimate here
    looping = rule.score("q", "77 × 7 = 539\n" * 4 + "Answer: 539", reference=meta)
    assert looping.scores["style"] == 4.0
    assert rule.score("q", "", reference=META).scores == {"accuracy": 1.0, "style": 1.0, "detail": 1.0}


def test_rule_judge_unsupported_task_is_a_failure_not_a_score(rule):
    code_meta = {"prompt": "def f(x):", "solution": "...", "tests": "assert f(1) == 2"}
    [result] = rule.score_many([JudgeItem("Write f", "def f(x): return x + 1", code_meta)])
    assert isinstance(result, JudgeFailure) and result.kind == "exception"
    assert "unsupported task" in result.message and "plugin 'judges' (phi4-engine" in result.message


def test_judges_are_registered_plugins():
    registry = PluginHost().collect_registry()
    assert {"rule", "openai-chat"} <= set(registry.kinds["judge"])
    judge = registry.build("judge", RuleJudgeSpec(kind="rule"))
    assert isinstance(judge, Judge)
    assert registry.get("judge", "rule").origin.name == "judges"


def test_openai_spec_refuses_a_key_in_place_of_the_env_name():
    with pytest.raises(Exception) as info:
        OpenAIChatSpec(kind="openai-chat", base_url="http://x/v1", model="m", api_key_env="sk-secret-123")
    assert "sk-secret-123" not in str(info.value)
    spec = OpenAIChatSpec(kind="openai-chat", base_url="http://x/v1/", model="m")
    assert spec.base_url == "http://x/v1" and spec.api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize("content", ['{"accuracy": 4, "style": 5, "detail": 3}',
                                     '```json\n{"faults": "", "discussion": "ok", "accuracy": 4, "style": 5, "detail": 3}\n```'])
def test_parse_scores_accepts(content):
    assert parse_scores(content) == {"accuracy": 4, "style": 5, "detail": 3}


@pytest.mark.parametrize("content", ["scores: 4 5 3", "[4, 5, 3]", '{"accuracy": 4, "style": 5}',
                                     '{"accuracy": 7, "style": 5, "detail": 3}', '{"accuracy": 4.5, "style": 5, "detail": 3}',
                                     '{"accuracy": "4", "style": 5, "detail": 3}', '{"accuracy": true, "style": 5, "detail": 3}',
                                     'Sure! ```json\n{"accuracy": 4, "style": 5, "detail": 3}\n```'])
def test_parse_scores_is_strict(content):
    with pytest.raises(ValueError):
        parse_scores(content)


# --- preference rule ------------------------------------------------------------------------


def test_prefer_accuracy_first_then_mean_then_tie():
    assert prefer(v(5, 1, 1), v(4, 5, 5)) == 1  # accuracy wins over a higher mean
    assert prefer(v(3, 5, 5), v(4, 1, 1)) == -1
    assert prefer(v(4, 5, 3), v(4, 3, 3)) == 1  # equal accuracy: the mean decides
    assert prefer(v(4, 2, 3), v(4, 3, 3)) == -1
    assert prefer(v(4, 5, 3), v(4, 3, 5)) == 0  # equal accuracy and mean: a tie


# --- verdict cache --------------------------------------------------------------------------


class CountingJudge(BaseJudge):
    """Scores by response length; fails on responses starting with 'bad'/'boom'; counts calls."""

    name, version, origin = "counting", "1", "plugin 'test' (tests 0)"

    def __init__(self, concurrency: int = 1) -> None:
        self.calls = 0
        self.concurrency = concurrency
        self._lock = threading.Lock()

    def score(self, prompt, response, *, reference=None):
        with self._lock:
            self.calls += 1
        if response.startswith("bad"):
            raise self.failure("malformed", "reply is not JSON", raw=f"<<{response}>>")
        if response.startswith("boom"):
            raise RuntimeError("exploded")
        n = min(5, max(1, len(response)))
        return self.verdict({"accuracy": n, "style": 3, "detail": 3}, raw="fine")


ITEMS = [JudgeItem([{"role": "user", "content": f"q{i}"}], "x" * (i % 5 + 1)) for i in range(8)]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_cache_survives_restart_and_resume_makes_no_calls(tmp_path, concurrency):
    judge = CountingJudge(concurrency)
    with VerdictCache(tmp_path) as cache:
        first = cache.score(judge, ITEMS)
    assert judge.calls == 8 and all(isinstance(r, Verdict) for r in first)
    assert len((tmp_path / "verdicts.jsonl").read_text().splitlines()) == 8

    resumed_judge = CountingJudge(concurrency)
    with VerdictCache(tmp_path) as cache:  # a new process: everything comes from the file
        assert len(cache) == 8
        again = cache.score(resumed_judge, ITEMS)
        assert cache.stats() == {"asked": 0, "cached": 8, "ok": 0, "malformed": 0, "failed": 0}
    assert resumed_judge.calls == 0
    assert again == first


def test_cache_key_depends_on_judge_version_and_string_prompt_is_user_turn(tmp_path):
    assert verdict_key("j", "1", "q", "r") == verdict_key("j", "1", [{"role": "user", "content": "q"}], "r")
    assert verdict_key("j", "1", "q", "r") != verdict_key("j", "2", "q", "r")
    judge = CountingJudge()
    with VerdictCache(tmp_path) as cache:
        cache.score(judge, ITEMS[:2])
        judge.version = "2"  # a new rubric/model: old verdicts are not reused
        cache.score(judge, ITEMS[:2])
    assert judge.calls == 4


def test_duplicates_in_one_batch_are_asked_once(tmp_path):
    judge = CountingJudge()
    with VerdictCache(tmp_path) as cache:
        results = cache.score(judge, [ITEMS[0], ITEMS[0], ITEMS[1]])
    assert judge.calls == 2 and results[0] == results[1]


def test_failures_are_quarantined_counted_and_never_scored(tmp_path):
    items = [JudgeItem("q1", "good"), JudgeItem("q2", "bad reply"), JudgeItem("q3", "boom"), JudgeItem("q4", "fine")]
    judge = CountingJudge()
    with VerdictCache(tmp_path) as cache:
        results = cache.score(judge, items)
        assert cache.stats() == {"asked": 4, "cached": 0, "ok": 2, "malformed": 1, "failed": 1}
    assert [type(r) for r in results] == [Verdict, JudgeFailure, JudgeFailure, Verdict]
    assert results[1].kind == "malformed" and results[1].raw == "<<bad reply>>"
    assert results[2].kind == "exception" and "RuntimeError: exploded" in results[2].message
    assert "plugin 'test' (tests 0)" in results[2].message

    quarantine = [json.loads(line) for line in (tmp_path / "judge-quarantine.jsonl").read_text().splitlines()]
    assert [q["kind"] for q in quarantine] == ["malformed", "exception"]
    assert quarantine[0]["raw"] == "<<bad reply>>" and quarantine[0]["response"] == "bad reply"
    verdicts = (tmp_path / "verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 2  # only real verdicts are cached

    again = CountingJudge()  # failures are asked again on resume; verdicts are not
    with VerdictCache(tmp_path) as cache:
        cache.score(again, items)
        assert cache.stats() == {"asked": 2, "cached": 2, "ok": 0, "malformed": 1, "failed": 1}
    assert again.calls == 2


class OutOfRangeJudge(BaseJudge):
    name, version = "sloppy", "1"

    def score(self, prompt, response, *, reference=None):
        return Verdict({"accuracy": 0.0, "style": 3.0, "detail": 3.0}, self.name, self.version)


def test_a_verdict_outside_1_to_5_is_malformed_not_cached(tmp_path):
    with VerdictCache(tmp_path) as cache:
        [result] = cache.score(OutOfRangeJudge(), [JudgeItem("q", "r")])
        assert isinstance(result, JudgeFailure) and result.kind == "malformed"
        assert len(cache) == 0 and cache.stats()["malformed"] == 1


def test_torn_last_line_is_dropped_and_corrupt_line_is_named(tmp_path):
    judge = CountingJudge()
    with VerdictCache(tmp_path) as cache:
        cache.score(judge, ITEMS[:3])
    path = tmp_path / "verdicts.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"key": "abc", "sco')  # killed mid-append
    with VerdictCache(tmp_path) as cache:
        assert len(cache) == 3
        cache.score(judge, ITEMS[3:4])
    assert len(path.read_text().splitlines()) == 4 and all(json.loads(x) for x in path.read_text().splitlines())

    path.write_bytes(b"not json\n" + whole)
    with pytest.raises(DataError, match=r"verdicts.jsonl:1: not a JSON record"):
        VerdictCache(tmp_path)
