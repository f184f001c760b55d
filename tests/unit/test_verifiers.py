"""Verifiers (PTS oracles): math answers by value, code by its tests in the sandbox."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from phi4_engine.engine import Engine
from phi4_engine.plugins.synthetic import SyntheticSource
from phi4_engine.plugins.verifiers import (
    MathAnswer,
    MathAnswerSpec,
    PythonTests,
    PythonTestsSpec,
    answers_match,
    extract_code,
    extract_final_answer,
    parse_number,
)

EMPTY = {"name": "v", "stages": []}


def test_registered_as_a_builtin_plugin_with_name_and_version():
    engine = Engine(EMPTY)
    info = {p.name: p for p in engine.plugins()}["verifiers"]
    assert info.kinds == {"verifier": ["math-answer", "python-tests"]}
    math = engine.registry.build("verifier", MathAnswerSpec(kind="math-answer", tolerance=0.01))
    code = engine.registry.build("verifier", PythonTestsSpec(kind="python-tests", timeout_s=2))
    assert (math.name, code.name) == ("math-answer", "python-tests")
    assert math.version and code.version
    assert math.spec.tolerance == 0.01 and code.spec.timeout_s == 2


def test_specs_are_strict():
    with pytest.raises(ValidationError):
        MathAnswerSpec(kind="math-answer", tolerance=-1)
    with pytest.raises(ValidationError, match="timeot_s"):
        PythonTestsSpec(kind="python-tests", timeot_s=3)
    assert "Sandboxes ``verify_many`` runs at once" in str(PythonTestsSpec.model_json_schema())


@pytest.mark.parametrize("text,value", [
    ("1/2", "1/2"), ("0.5", "1/2"), ("2/4", "1/2"), ("\\frac{1}{2}", "1/2"), ("\\dfrac{2}{4}", "1/2"),
    ("-\\frac{3}{4}", "-3/4"), ("1,234", "1234"), ("1,234,567", "1234567"), ("3.0", "3"), ("3.000", "3"),
    ("-7", "-7"), ("−7", "-7"), ("+7", "7"), ("$42$", "42"), ("42.", "42"), ("\\boxed{12}", "12"),
    (".25", "1/4"), ("1e3", "1000"), ("(-2)", "-2"),
])
def test_parse_number(text, value):
    assert parse_number(text) == parse_number(value) is not None


@pytest.mark.parametrize("text", ["abc", "1/0", "1, 2", "", "x+1"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("completion,answer,accepted", [
    ("3 + 4 = 7\nAnswer: 7", "7", True),
    ("Answer: 7", "8", False),
    ("Answer: 0.5", "1/2", True),
    ("Answer: 2/4", "0.5", True),
    ("Answer: \\frac{1}{2}", "0.5", True),
    ("Answer: 1,234", "1234", True),
    ("Answer: 1234.0", "1,234", True),
    ("Answer: -12", "-12", True),
    ("Answer: -12", "12", False),
    ("Answer: 12 + 30 = 42", "42", True),
    ("Answer: x = -5", "-5", True),
    ("Answer: 42 apples.", "42", True),
    ("Answer: 41\n...wait, no.\nAnswer: 42", "42", True),  # the last Answer counts
    ("Answer: 42\nThen some chatter with 99 in it", "42", True),  # Answer: wins over the last number
    ("so the result is $\\boxed{\\frac{3}{4}}$.", "0.75", True),
    ("We get 3/4 of 12, which is 9.", "9", True),  # the last number, no Answer: line
    ("I don't know", "5", False),
    ("", "5", False),
    ("Answer: yes", "Yes", True),  # non-numeric answers compare as text
])
def test_math_answer_table(completion, answer, accepted):
    assert MathAnswer().verify({"answer": answer}, completion) is accepted


def test_math_answer_tolerance():
    exact = MathAnswer()
    loose = MathAnswer(MathAnswerSpec(kind="math-answer", tolerance=1e-3))
    assert not exact.verify({"answer": "1/3"}, "Answer: 0.3333")
    assert loose.verify({"answer": "1/3"}, "Answer: 0.3333")
    assert not loose.verify({"answer": "1/3"}, "Answer: 0.33")
    assert answers_match("3.14159", "3.1416", 1e-4)


def test_math_answer_on_synthetic_arithmetic():
    source = SyntheticSource("synthetic-arithmetic", seed=0)
    verifier = MathAnswer()
    for i in range(20):
        sample = source.sample(i)
        assert verifier.verify(sample.meta, sample.response), sample.response
        wrong = sample.response.rsplit("Answer:", 1)[0] + f"Answer: {int(sample.meta['answer']) + 1}"
        assert not verifier.verify(sample.meta, wrong)
    with pytest.raises(ValueError, match="answer"):
        verifier.verify({}, "Answer: 1")


def test_extract_final_answer():
    assert extract_final_answer("Answer: 5") == "5"
    assert extract_final_answer("answer:\n  -3") == "-3"
    assert extract_final_answer("thus \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_final_answer("no numbers") is None


@pytest.mark.parametrize("completion,code", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("Here:\n```py\nx = 1\n```\nand usage:\n```python\nprint(x)\n```", "x = 1\n"),
    ("```\nx = 2\n```", "x = 2\n"),
    ("```text\nnot code\n```\n```python\nx = 3\n```", "x = 3\n"),
    ("```python\ndef cut_off():\n    return", "def cut_off():\n    return\n"),  # unterminated
    ("def bare():\n    return 4\n", "def bare():\n    return 4\n"),
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


@pytest.fixture(scope="module")
def code_tasks():
    source = SyntheticSource("synthetic-code", seed=0)
    return [source.sample(i) for i in range(6)]


def test_python_tests_accepts_synthetic_solutions_and_rejects_wrong_ones(code_tasks):
    verifier = PythonTests(PythonTestsSpec(kind="python-tests", timeout_s=5))
    for sample in code_tasks:
        assert verifier.verify(sample.meta, sample.response), sample.meta["solution"]
        assert verifier.verify(sample.meta, sample.meta["solution"])  # no fence: the whole text
        broken = sample.meta["prompt"] + "    return None\n"
        assert not verifier.verify(sample.meta, f"```python\n{broken}```")
    first, other = code_tasks[0], next(s for s in code_tasks if s.meta["prompt"] != code_tasks[0].meta["prompt"])
    assert not verifier.verify(first.meta, other.response)  # a solution to another task


def test_python_tests_rejects_cheats_and_hostile_code(code_tasks):
    verifier = PythonTests(PythonTestsSpec(kind="python-tests", timeout_s=1))
    meta = code_tasks[0].meta
    solution = meta["solution"]
    assert not verifier.verify(meta, f"```python\n{solution}import sys\nsys.exit(0)\n```")  # skips the tests
    assert not verifier.verify(meta, f"```python\n{solution}import os\nos._exit(0)\n```")
    assert not verifier.verify(meta, f"```python\n{solution}while True:\n    pass\n```")
    assert not verifier.verify(meta, f"```python\n{solution}import socket\nsocket.socket()\n```")
    result, marker = verifier.run(meta, f"```python\n{solution}import sys\nsys.exit(0)\n```")
    assert result.verdict == "ok" and marker not in result.stdout
    with pytest.raises(ValueError, match="tests"):
        verifier.verify({}, solution)


def test_verify_many_runs_concurrently_and_in_order(code_tasks):
    verifier = PythonTests(PythonTestsSpec(kind="python-tests", timeout_s=5, concurrency=4))
    slow = "import time\ntime.sleep(0.6)\n"
    items = []
    for i, sample in enumerate(code_tasks[:4]):
        good = f"```python\n{slow}{sample.meta['solution']}```"
        bad = f"```python\n{slow}{sample.meta['prompt']}    raise ValueError({i})\n```"
        items += [(sample.meta, good), (sample.meta, bad)]
    start = time.monotonic()
    verdicts = verifier.verify_many(items)
    elapsed = time.monotonic() - start
    assert verdicts == [True, False] * 4
    assert elapsed < 8 * 0.6 * 0.6, f"{elapsed:.2f}s: 8 sleeping runs did not overlap"
    duplicates = [items[0]] * 5 + [items[1]] * 5
    assert verifier.verify_many(duplicates) == [True] * 5 + [False] * 5
    assert verifier.verify_many([]) == []
    assert MathAnswer().verify_many([({"answer": "1"}, "Answer: 1"), ({"answer": "1"}, "Answer: 2")]) == [True, False]

