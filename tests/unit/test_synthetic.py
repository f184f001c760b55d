"""Synthetic sources: deterministic, random access, correct arithmetic, code tests that pass."""

from __future__ import annotations

import ast
import operator
import re

import pytest
from pydantic import ValidationError

from phi4_engine.data import SourceContext
from phi4_engine.plugins import synthetic
from phi4_engine.plugins.synthetic import KINDS, SyntheticSource

ALL_KINDS = list(KINDS)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_deterministic_random_access_and_seeded(kind):
    a = SyntheticSource(kind, seed=7, num_documents=300)
    b = SyntheticSource(kind, seed=7, num_documents=300)
    seq = list(a.documents())
    assert len(seq) == len(a) == 300
    assert seq == list(b.documents())
    assert list(a.documents(123)) == seq[123:]
    assert [b.document(i) for i in (299, 5, 123)] == [seq[299], seq[5], seq[123]]
    assert list(a.documents(300)) == []
    assert len({d.id for d in seq}) == 300
    texts = [d.text for d in seq]
    assert all(t.strip() for t in texts)
    assert len(set(texts)) > 200  # varied, not one template repeated
    other_seed = [d.text for d in SyntheticSource(kind, seed=8, num_documents=300).documents()]
    assert sum(x != y for x, y in zip(texts, other_seed)) > 250
    renamed = [d.text for d in SyntheticSource(kind, seed=7, num_documents=300, name="other").documents()]
    assert renamed != texts


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_chat_format(kind):
    text = SyntheticSource(kind, seed=1, num_documents=20)
    chat = SyntheticSource(kind, seed=1, num_documents=20, format="chat")
    for t, c in zip(text.documents(), chat.documents()):
        assert c.text == "" and c.id == t.id and c.meta == t.meta
        user, assistant = c.messages
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] and assistant["content"]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_STEP = re.compile(r"^(\d+) ([+\-×÷]) (\d+) = (\d+)$")
_STEP_OPS = {"+": operator.add, "-": operator.sub, "×": operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    assert isinstance(node, ast.BinOp) and type(node.op) in _OPS, ast.dump(node)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.FloorDiv):
        assert right and left % right == 0, "divisions are exact"
    return _OPS[type(node.op)](left, right)


def test_arithmetic_answers_are_correct():
    src = SyntheticSource("synthetic-arithmetic", seed=3, num_documents=2000)
    word_problems = 0
    for doc in src.documents():
        meta = doc.meta
        answer = _evaluate(ast.parse(meta["expression"], mode="eval"))
        assert meta["answer"] == str(answer)
        assert doc.text.endswith(f"\nAnswer: {answer}")
        assert meta["question"] in doc.text
        steps = [_STEP.match(line) for line in doc.text.splitlines() if "=" in line]
        assert 2 <= len(steps) <= 3 and all(steps), doc.text
        for m in steps:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a < 1000 and b < 100 and 0 <= c < 1000
            assert (a // b if op == "÷" else _STEP_OPS[op](a, b)) == c
            if op == "÷":
                assert a % b == 0
        assert int(steps[-1][4]) == answer
        if meta["question"].startswith("Compute "):
            written = meta["question"][len("Compute "):-1].replace("×", "*").replace("÷", "//")
            assert _evaluate(ast.parse(written, mode="eval")) == answer  # written order = evaluation order
        else:
            word_problems += 1
    assert 500 < word_problems < 1500


def test_code_tests_pass_with_solution_and_fail_without_body():
    src = SyntheticSource("synthetic-code", seed=5, num_documents=400)
    names = set()
    for doc in src.documents():
        meta = doc.meta
        assert meta["solution"].startswith(meta["prompt"])
        assert meta["tests"].count("assert ") == 3
        assert meta["solution"] in doc.text and meta["tests"] in doc.text
        namespace: dict = {}
        exec(compile(meta["solution"] + "\n" + meta["tests"], doc.id, "exec"), namespace)  # noqa: S102
        names.add(meta["prompt"].split("(")[0])
        with pytest.raises(AssertionError):  # the tests do test something
            exec(meta["prompt"] + "    return None\n" + meta["tests"], {})  # noqa: S102
    assert len(names) > 20  # many distinct tasks


def test_prose_and_academic_look_right():
    prose = [d.text for d in SyntheticSource("synthetic-prose", seed=0, num_documents=50).documents()]
    assert all(t.count(".") >= 5 for t in prose)
    academic = [d.text for d in SyntheticSource("synthetic-academic", seed=0, num_documents=100).documents()]
    assert sum("Definition" in t for t in academic) > 40
    assert all(re.search(r"\(\w[^()]*\d{4}\)|\[\d+\]", t) for t in academic)  # a citation in each


def test_specs_and_registration():
    registered = {}
    synthetic.phi4_register_data_sources(lambda kind, model, factory: registered.__setitem__(kind, (model, factory)))
    assert set(registered) == {"synthetic-arithmetic", "synthetic-code", "synthetic-prose", "synthetic-academic", "synthetic-refusal"}
    model, factory = registered["synthetic-code"]
    spec = model.model_validate({"kind": "synthetic-code", "num_documents": 10, "format": "chat", "weight": 0.2})
    src = factory(spec, SourceContext(base_dir=".", seed=11))
    assert len(src) == 10 and src.name == "synthetic-code" and src.seed == 11
    assert next(src.documents()).messages is not None
    assert model.model_validate({"kind": "synthetic-code"}).num_documents == 2000
    for bad in ({"kind": "synthetic-code", "num_documents": 0}, {"kind": "synthetic-prose"},
                {"kind": "synthetic-code", "format": "html"}, {"kind": "synthetic-code", "extra": 1}):
        with pytest.raises(ValidationError):
            model.model_validate(bad)


def test_arithmetic_difficulty_knobs():
    import re

    src = SyntheticSource("synthetic-arithmetic", seed=3, num_documents=200, options={"operations": (1, 1), "max_operand": 12})
    for i in range(200):
        s = src.sample(i)
        steps = [l for l in s.response.splitlines() if re.fullmatch(r"\d+ [+\-×÷] \d+ = \d+", l)]
        assert len(steps) == 1, s.response
        a, _, b, _, c = steps[0].split()
        assert int(a) <= 12 and int(b) <= 12
        assert s.meta["answer"] == c
    default = SyntheticSource("synthetic-arithmetic", seed=3, num_documents=5)
    assert default.sample(0) == SyntheticSource("synthetic-arithmetic", seed=3, num_documents=5, options={}).sample(0)


def test_arithmetic_knobs_are_validated_in_specs():
    from phi4_engine.engine import Engine
    from phi4_engine.errors import SpecError
    from tests.conftest import tiny_pretrain_spec

    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["sources"][0].update(operations=[3, 1])
    with pytest.raises(SpecError, match="operations must be"):
        Engine(data).validate()
