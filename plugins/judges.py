"""Built-in judges: ``rule`` (checks embedded arithmetic tasks, no model) and ``openai-chat``
(any OpenAI-compatible chat-completions endpoint with the paper's accuracy/style/detail rubric).

Both return :class:`phi4_engine.judging.Verdict` or raise :class:`~phi4_engine.judging.JudgeError`;
neither ever invents a score for a judgment that did not happen (FACTS.md §7.11).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from fractions import Fraction
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from phi4_engine import __version__, hookimpl
from phi4_engine.errors import EngineError
from phi4_engine.judging import DIMENSIONS, BaseJudge, JudgeItem, OnResult, Result, Verdict, canonical_prompt
from phi4_engine.manager import DISTRIBUTION, PluginOrigin
from phi4_engine.answers import extract_answer
from phi4_engine.spec.base import SpecModel

ORIGIN = str(PluginOrigin("judges", DISTRIBUTION, __version__))

# ---------------------------------------------------------------------------------------------
# rule: deterministic scores for the embedded arithmetic tasks (synthetic-arithmetic meta).


class RuleJudgeSpec(SpecModel):
    """Deterministic judge for tasks with a known answer (``meta.answer``); no model, no network."""

    kind: Literal["rule"]
    expected_steps: int = Field(2, ge=1)
    """Worked steps a full solution shows when the task's ``meta.expression`` does not say."""


_STEP = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(//|[-+−×xX*÷/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)\s*$")
_FINAL = re.compile(r"^Answer:\s*-?[\d,]+(?:\.\d+)?$")
_OPS = {"+": "+", "-": "-", "−": "-", "×": "*", "x": "*", "X": "*", "*": "*", "÷": "/", "/": "/", "//": "/"}


def _step_is_true(a: str, op: str, b: str, c: str) -> bool:
    x, y, z = Fraction(a), Fraction(b), Fraction(c)
    kind = _OPS[op]
    if kind == "/":
        return y != 0 and x / y == z
    return {"+": x + y, "-": x - y, "*": x * y}[kind] == z


def _same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and Fraction(a) == Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return False


class RuleJudge(BaseJudge):
    """Rubric (each dimension 1–5), from the task's reference ``meta``:

    * **accuracy**: 5 if the last ``Answer: N`` equals ``meta.answer`` (the same extraction the
      ``task-accuracy`` evaluation uses), else 1. Binary on purpose: the answer is right or not.
    * **detail** (showing the steps): lines ``a op b = c`` that are arithmetically true, against
      the operations in ``meta.expression`` (else ``expected_steps``): 1 with none shown, 5 with
      all; each false step line costs 1 (a wrong step is worse than a missing one).
    * **style** (format): starts at 5; -2 if the last line is not ``Answer: N``; -1 for more than
      one ``Answer:``; -1 for a repeated non-step line or more step lines than steps (a looping
      model); -1 for rambling (more than 2×steps+3 lines or 600 characters).

    Tasks without ``meta.answer`` (code, prose) fail with "unsupported task": no score is guessed.
    """

    name = "rule"
    version = "rule-1"  # bump when the rubric changes, so cached verdicts are not reused
    origin = ORIGIN

    def __init__(self, spec: RuleJudgeSpec) -> None:
        self.spec = spec

    def score(self, prompt: list[dict[str, str]] | str, response: str, *, reference: dict[str, Any] | None = None) -> Verdict:
        if not reference or "answer" not in reference:
            keys = sorted(reference) if reference else []
            raise self.failure("exception", f"unsupported task: the rule judge scores tasks whose reference has an "
                               f"'answer' (synthetic-arithmetic meta); reference keys: {keys}")
        expected = str(reference["answer"])
        ops = re.findall(r"//|[-+*/×÷]", str(reference.get("expression", "")))
        needed = len(ops) or self.spec.expected_steps
        lines = [line.strip() for line in response.strip().splitlines() if line.strip()]

        got = extract_answer(response)
        accuracy = 5 if _same_number(got, expected) else 1

        steps = [m.groups() for m in map(_STEP.match, lines) if m]
        true = sum(_step_is_true(*s) for s in steps)
        false = len(steps) - true
        detail = 1 if true == 0 else 1 + round(4 * min(true, needed) / needed)
        detail = max(1, detail - false)

        style, notes = 5, []
        if not lines or not _FINAL.match(lines[-1]):
            style, notes = style - 2, notes + ["no final 'Answer: N' line"]
        if sum("Answer:" in line for line in lines) > 1:
            style, notes = style - 1, notes + ["several 'Answer:' lines"]
        prose = [line for line in lines if not _STEP.match(line)]  # a step may legitimately recur
        if len(set(prose)) < len(prose) or len(steps) > needed:
            style, notes = style - 1, notes + ["repeated lines"]
        if len(lines) > 2 * needed + 3 or len(response) > 600:
            style, notes = style - 1, notes + ["rambling"]
        style = max(1, style) if lines else 1

        raw = (f"answer {got!r} vs expected {expected!r}; {true} true and {false} false step lines of {needed}; "
               f"style: {', '.join(notes) or 'ok'}")
        return self.verdict({"accuracy": accuracy, "style": style, "detail": detail}, raw)


# ---------------------------------------------------------------------------------------------
# openai-chat: an LLM judge over HTTP, standard library only.

RUBRIC = """You are an expert grader of AI assistant responses. You will see a conversation and one \
assistant response to its last user turn (and, when available, a reference answer). Grade the \
response on three dimensions, each an integer from 1 (very poor) to 5 (excellent):
- accuracy: is it correct and free of factual, logical and computational errors, and does it \
answer what was asked?
- style: is it clear, well organized, and in a tone and format that fit the request?
- detail: is it complete, covering what the question needs and showing the reasoning where it helps?
Do not penalize length unless the user asked for brevity. First list the response's faults, then \
discuss them, then give the scores. Reply with only one JSON object with exactly these keys:
{"faults": "<the faults>", "discussion": "<your reasoning>", "accuracy": <1-5>, "style": <1-5>, "detail": <1-5>}"""
"""After [P4] App. A.2 (GPT-4o grades accuracy, style, detail 1–5 in JSON: faults, discussion,
then scores; length not penalized unless asked). Our wording; its sha256 is part of the judge
version, so editing it invalidates cached verdicts."""

RUBRIC_SHA = hashlib.sha256(RUBRIC.encode()).hexdigest()[:12]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FENCED = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?```\Z", re.S)


class OpenAIChatSpec(SpecModel):
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp server…)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a pasted key must not echo in errors

    kind: Literal["openai-chat"]
    base_url: str
    """Up to the version path, e.g. ``https://api.openai.com/v1``; ``/chat/completions`` is added."""
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    """NAME of the environment variable holding the key, read at call time and never written
    anywhere; null sends no Authorization header (local servers)."""
    timeout_s: float = Field(60.0, gt=0)
    """Socket timeout per attempt."""
    max_retries: int = Field(3, ge=0)
    """Retries after the first attempt, for timeouts, connection errors, 429 and 5xx."""
    backoff_s: float = Field(1.0, ge=0)
    """First back-off; doubles per retry, with deterministic jitter; 429 Retry-After wins."""
    max_backoff_s: float = Field(60.0, ge=0)
    """Cap on any single wait, Retry-After included."""
    concurrency: int = Field(4, ge=1)
    """Requests in flight at once."""
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    """Seeds the back-off jitter, so retries are reproducible."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                             "never the key itself")
        return value


def parse_scores(content: str) -> dict[str, int]:
    """The reply must be one JSON object (optionally the whole of a ```json fence) with integer
    ``accuracy``, ``style`` and ``detail`` in 1..5. Raises ``ValueError`` otherwise; no repair,
    no defaults, because a guessed score would silently become a training pair."""
    text = content.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError("reply is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError(f"reply is JSON {type(obj).__name__}, not an object")
    for dim in DIMENSIONS:
        if dim not in obj:
            raise ValueError(f"score {dim!r} is missing")
        value = obj[dim]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise ValueError(f"score {dim!r} = {value!r} is not an integer in 1..5")
    return {dim: obj[dim] for dim in DIMENSIONS}


def _render(prompt: list[dict[str, str]] | str, response: str, reference: dict[str, Any] | None) -> str:
    turns = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in canonical_prompt(prompt))
    ref = f"\n\n## Reference answer\n{reference['answer']}" if reference and "answer" in reference else ""
    return f"## Conversation\n{turns}{ref}\n\n## Response to grade\n{response}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class OpenAIChatJudge(BaseJudge):
    """Scores with the :data:`RUBRIC`; see :class:`OpenAIChatSpec` for retries and limits."""

    name = "openai-chat"
    origin = ORIGIN

    def __init__(self, spec: OpenAIChatSpec) -> None:
        self.spec = spec
        self.concurrency = spec.concurrency
        self.url = f"{spec.base_url}/chat/completions"
        self.version = f"model={spec.model};rubric={RUBRIC_SHA};temperature={spec.temperature}"

    def _key(self) -> str | None:
        if self.spec.api_key_env is None:
            return None
        key = os.environ.get(self.spec.api_key_env)
        if not key:
            raise EngineError(f"judge {self.name!r} ({self.origin}): environment variable "
                              f"{self.spec.api_key_env} is not set; it must hold the API key")
        return key

    def score_many(self, items: list[JudgeItem], *, on_result: OnResult | None = None) -> list[Result]:
        self._key()  # fail the run once, up front, rather than every item
        return super().score_many(items, on_result=on_result)

    def score(self, prompt: list[dict[str, str]] | str, response: str, *, reference: dict[str, Any] | None = None) -> Verdict:
        request: dict[str, Any] = {
            "model": self.spec.model,
            "temperature": self.spec.temperature,
            "messages": [{"role": "system", "content": RUBRIC}, {"role": "user", "content": _render(prompt, response, reference)}],
        }
        if self.spec.max_tokens is not None:
            request["max_tokens"] = self.spec.max_tokens
        key = self._key()
        body = self._post(json.dumps(request).encode(), key)
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise self._fail("malformed", f"not a chat completion ({type(exc).__name__}: {exc})", body, key) from None
        try:
            scores = parse_scores(content)
        except ValueError as exc:
            raise self._fail("malformed", str(exc), content, key) from None
        return self.verdict(scores, _redact(content, key))

    def _fail(self, kind: Any, message: str, raw: str | None, key: str | None) -> Exception:
        return self.failure(kind, _redact(message, key), None if raw is None else _redact(raw, key))

    def _post(self, body: bytes, key: str | None) -> str:
        """POST with retries; returns the response body or raises a ``timeout``/``http`` failure."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        rng = random.Random(f"{self.spec.seed}:{hashlib.sha256(body).hexdigest()}")
        attempts = 1 + self.spec.max_retries
        for attempt in range(attempts):
            wait, raw = None, None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.spec.timeout_s) as resp:
                    return resp.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                raw = _read(exc)
                kind, problem = "http", f"HTTP {exc.code} {exc.reason}: {raw[:200]!r}"
                if exc.code == 429 or exc.code == 503:
                    wait = _retry_after(exc.headers.get("Retry-After"))
                if exc.code not in (408, 429) and exc.code < 500:
                    raise self._fail(kind, f"{problem} (not retried)", raw, key) from None
            except urllib.error.URLError as exc:
                timed_out = isinstance(exc.reason, TimeoutError)
                kind, problem = ("timeout" if timed_out else "http"), f"{self.url}: {exc.reason}"
            except TimeoutError:
                kind, problem = "timeout", f"no reply within {self.spec.timeout_s} s"
            except OSError as exc:  # connection reset, remote closed, http.client protocol errors
                kind, problem = "http", f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # http.client.HTTPException is not an OSError
                kind, problem = "http", f"{type(exc).__name__}: {exc}"
            if attempt + 1 == attempts:
                raise self._fail(kind, f"{problem} (after {attempts} attempts)", raw, key)
            if wait is None:
                base = self.spec.backoff_s * 2**attempt
                wait = base / 2 + rng.uniform(0, base / 2)
            time.sleep(min(wait, self.spec.max_backoff_s))
        raise AssertionError("unreachable")


def _read(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace")
    except Exception:
        return ""


def _redact(text: str, key: str | None) -> str:
    """A server may echo request headers; the key must not reach verdicts, quarantine or logs."""
    return text.replace(key, "[REDACTED]") if key else text


@hookimpl
def phi4_register_judges(register):
    register("rule", RuleJudgeSpec, RuleJudge)
    register("openai-chat", OpenAIChatSpec, OpenAIChatJudge)
