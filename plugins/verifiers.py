"""Built-in verifiers (the oracles of Pivotal Token Search): ground truth for math, tests for code.

A verifier accepts or rejects one completion of one task: ``verify(task_meta, completion) ->
bool``, where ``task_meta`` is the task's ``meta`` (what the synthetic sources put there, or a
JSONL record's ``meta``). ``verify_many([(meta, completion), ...])`` checks many at once (PTS
asks for hundreds of rollouts per prefix). Each verifier has a ``name`` (its kind) and a
``version`` that changes whenever its judgement could change, so cached verdicts can be keyed by
both.

* ``math-answer``: the final answer of the completion (the last ``Answer: ...``, else the last
  ``\\boxed{...}``, else the last number) equals ``meta["answer"]``. Numbers compare as exact
  fractions (``1/2`` = ``0.5`` = ``2/4`` = ``\\frac{1}{2}``; ``1,234`` = ``1234``; ``3.0`` = ``3``),
  or within ``tolerance`` (absolute) when it is set; a non-numeric answer compares as
  normalized text.
* ``python-tests``: the completion's code (its first ```` ```python ```` block, else its first
  unlabeled fenced block, else the whole text) followed by ``meta["tests"]`` runs in
  :func:`phi4_engine.sandbox.run_python`; accepted iff it exits cleanly *after* the tests ran (a
  random marker printed after the tests must appear, so code that calls ``sys.exit(0)`` early is
  rejected).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Iterable, Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.sandbox import SandboxResult, run_python
from phi4_engine.spec.base import SpecModel

Item = tuple[dict[str, Any], str]
"""One ``(task_meta, completion)`` pair."""


class Verifier(ABC):
    """Base of the built-in verifiers: ``verify`` one completion, ``verify_many`` a batch."""

    name: str = ""
    version: str = ""

    @abstractmethod
    def verify(self, task_meta: dict[str, Any], completion: str) -> bool:
        """True when ``completion`` solves the task described by ``task_meta``."""

    def verify_many(self, items: Iterable[Item]) -> list[bool]:
        return [self.verify(meta, completion) for meta, completion in items]


# ---------------------------------------------------------------------------------------------
# math-answer

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_SIGNED = rf"[-+]?(?:{_NUM})"
_NUMBER_TOKEN = re.compile(rf"(?<![\w.]){_SIGNED}(?:\s*/\s*(?:{_NUM}))?(?![\w])")
_NUMBER_FULL = re.compile(rf"([-+]?)\(?({_SIGNED})\)?(?:/\(?({_SIGNED})\)?)?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_ANSWER = re.compile(r"answer\s*:\s*(\S[^\n]*)", re.IGNORECASE)
_WRAPPERS = ("$", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,", "\\;", "\\left", "\\right", "{,}", "^\\circ", "°", "%", "\\%")


def _braced(text: str, start: int) -> str | None:
    """The contents of the ``{...}`` opening at ``text[start]`` (nested braces allowed)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    at = text.rfind("\\boxed")
    while at != -1:
        brace = text.find("{", at)
        if brace != -1 and not text[at + len("\\boxed") : brace].strip():
            inner = _braced(text, brace)
            if inner is not None:
                return inner
        at = text.rfind("\\boxed", 0, at)
    return None


def _frac_as_division(match: re.Match[str]) -> str:
    top, bottom = match.group(1), match.group(2)
    simple = re.compile(_SIGNED)
    if simple.fullmatch(top) and simple.fullmatch(bottom):
        return f"{top}/{bottom}"
    return f"({top})/({bottom})"


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _FRAC.sub(_frac_as_division, text)
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return text


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (integer, decimal, fraction, ``\\frac``), or ``None``.

    Ignores ``$``, LaTeX spacing and delimiters, thousands commas, a ``%`` or degree sign, a
    trailing period and surrounding whitespace; ``\\boxed{x}`` is read as ``x``.
    """
    text = _clean(text.strip())
    boxed = _last_boxed(text)
    if boxed is not None:
        text = _clean(boxed)
    for wrapper in _WRAPPERS:
        text = text.replace(wrapper, "")
    text = re.sub(r"\s+", "", text).rstrip(".")
    match = _NUMBER_FULL.fullmatch(text)
    if not match:
        return None
    sign, numerator, denominator = match.groups()
    try:
        value = Fraction(numerator.replace(",", ""))
        if denominator is not None:
            value /= Fraction(denominator.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return -value if sign == "-" else value


def _normalize_text(text: str) -> str:
    text = _clean(text)
    for wrapper in _WRAPPERS:
        text = text.replace(wrapper, "")
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def _pick(segment: str) -> str:
    """The answer inside an ``Answer:`` segment: after the last ``=``, the whole if it is a
    number, else its first number ("42 apples" -> "42"), else the text."""
    segment = segment.strip()
    boxed = _last_boxed(segment)
    if boxed is not None:
        return boxed
    if "=" in segment:
        segment = segment.rsplit("=", 1)[1].strip()
    if parse_number(segment) is not None:
        return segment
    found = _NUMBER_TOKEN.search(_clean(segment))
    return found.group(0) if found else segment


def extract_final_answer(text: str) -> str | None:
    """The final answer of a completion: the last ``Answer: ...`` (case-insensitive), else the
    last ``\\boxed{...}``, else the last number (or fraction) in the text; ``None`` if none."""
    answers = _ANSWER.findall(text)
    if answers:
        return _pick(answers[-1])
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_TOKEN.findall(_clean(text))
    return numbers[-1] if numbers else None


def answers_match(got: str, expected: str, tolerance: float = 0) -> bool:
    """Whether answer ``got`` equals ``expected``: as numbers (exactly, or within ``tolerance``)
    when ``expected`` is a number, else as normalized text."""
    want = parse_number(expected)
    if want is not None:
        have = parse_number(got)
        if have is None:
            return False
        return have == want if tolerance == 0 else abs(float(have - want)) <= tolerance
    return _normalize_text(got) == _normalize_text(expected)


class MathAnswerSpec(SpecModel):
    """Ground-truth oracle: the completion's final answer equals the task's ``meta.answer``."""

    kind: Literal["math-answer"]
    """Verifier kind."""
    tolerance: float = Field(0, ge=0)
    """Largest accepted absolute difference between numeric answers; 0 compares exactly (as fractions)."""


class MathAnswer(Verifier):
    name = "math-answer"
    version = "1"

    def __init__(self, spec: MathAnswerSpec | None = None) -> None:
        self.spec = spec or MathAnswerSpec(kind="math-answer")

    def verify(self, task_meta: dict[str, Any], completion: str) -> bool:
        if "answer" not in task_meta:
            raise ValueError("math-answer needs the task's meta['answer']")
        got = extract_final_answer(completion)
        return got is not None and answers_match(got, str(task_meta["answer"]), self.spec.tolerance)


# ---------------------------------------------------------------------------------------------
# python-tests

_FENCE_OPEN = re.compile(r"^\s*```+\s*([\w+#.-]*)")
_PYTHON_LANGS = {"python", "python3", "py", "py3"}


def extract_code(completion: str) -> str:
    """The code of a completion: its first ```` ```python ```` block, else its first unlabeled
    fenced block (an unterminated block runs to the end), else the whole text."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in completion.splitlines():
        if current is None:
            opened = _FENCE_OPEN.match(line)
            if opened:
                current = []
                blocks.append((opened.group(1).lower(), current))
        elif line.strip().startswith("```"):
            current = None
        else:
            current.append(line)
    for wanted in (lambda lang: lang in _PYTHON_LANGS, lambda lang: lang == ""):
        for lang, lines in blocks:
            if wanted(lang):
                return "\n".join(lines) + "\n"
    return completion


class PythonTestsSpec(SpecModel):
    """Tests oracle: the completion's code passes the task's ``meta.tests`` in the sandbox."""

    kind: Literal["python-tests"]
    """Verifier kind."""
    timeout_s: float = Field(5, gt=0, le=600)
    """Wall-clock limit for code plus tests, in seconds."""
    memory_mb: int = Field(256, ge=64)
    """Address-space limit of the sandboxed interpreter, in MiB."""
    concurrency: int = Field(4, ge=1)
    """Sandboxes ``verify_many`` runs at once."""


class PythonTests(Verifier):
    name = "python-tests"
    version = "1"

    def __init__(self, spec: PythonTestsSpec | None = None) -> None:
        self.spec = spec or PythonTestsSpec(kind="python-tests")

    def run(self, task_meta: dict[str, Any], completion: str) -> tuple[SandboxResult, str]:
        """Run the completion's code and the task's tests; the sandbox result and the marker that
        the tests print once they all passed (for diagnosing a rejection)."""
        if "tests" not in task_meta:
            raise ValueError("python-tests needs the task's meta['tests']")
        marker = f"phi4-tests-passed-{secrets.token_hex(8)}"
        program = f"{extract_code(completion)}\n\n{task_meta['tests']}\nprint({marker!r})\n"
        return run_python(program, timeout_s=self.spec.timeout_s, memory_mb=self.spec.memory_mb), marker

    def verify(self, task_meta: dict[str, Any], completion: str) -> bool:
        result, marker = self.run(task_meta, completion)
        return result.verdict == "ok" and marker in result.stdout

    def verify_many(self, items: Iterable[Item]) -> list[bool]:
        """Verify every item, up to ``concurrency`` sandboxes at once; identical (code, tests)
        pairs run once."""
        items = list(items)
        keys = []
        unique: dict[tuple[str, str], Item] = {}
        for meta, completion in items:
            if "tests" not in meta:
                raise ValueError("python-tests needs the task's meta['tests']")
            key = (extract_code(completion), str(meta["tests"]))
            keys.append(key)
            unique.setdefault(key, (meta, completion))
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=min(self.spec.concurrency, len(unique))) as pool:
            verdicts = dict(zip(unique, pool.map(lambda item: self.verify(*item), unique.values())))
        return [verdicts[key] for key in keys]


@hookimpl
def phi4_register_verifiers(register):
    register("math-answer", MathAnswerSpec, MathAnswer)
    register("python-tests", PythonTestsSpec, PythonTests)
