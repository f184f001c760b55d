"""What a judge is, how two verdicts compare, and the verdict cache that makes judging resumable.

DPO round 2 ([P4] §4.2, App. A.2; FACTS.md §3) ranks candidate responses by a judge's 1–5 scores
on three dimensions: ``accuracy``, ``style`` and ``detail`` (the paper's completeness). Judges are
plugins (``phi4_register_judges``); this module holds only what every judge and every caller
shares:

* :class:`Verdict` (scores) and :class:`JudgeFailure` (no scores, ever: FACTS.md §7.11 names the
  anti-pattern of turning a failed judgment into 0.0);
* the :class:`Judge` protocol and :class:`BaseJudge`, which gives plugins ``score_many`` with a
  thread pool and turns exceptions into failures that name the plugin and its version;
* :func:`prefer`, the preference rule;
* :class:`VerdictCache`, an fsync'd JSONL of verdicts so a resumed run never pays twice for a
  judgment, plus a quarantine JSONL and counters for failures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Protocol, Sequence, runtime_checkable

from phi4_engine.errors import DataError, EngineError
from phi4_engine.rundir import AppendLog

DIMENSIONS: tuple[str, ...] = ("accuracy", "style", "detail")
"""The paper's rubric; ``detail`` is what FACTS.md calls completeness."""

FailureKind = Literal["malformed", "timeout", "http", "exception"]


@dataclass(frozen=True)
class Verdict:
    """A judge's scores for one (prompt, response): every dimension of :data:`DIMENSIONS`, 1–5."""

    scores: dict[str, float]
    judge: str
    judge_version: str
    raw: str | None = None
    """What the judge said (an LLM's reply, the rule judge's reasons), kept for audit."""

    @property
    def mean(self) -> float:
        """The paper's "overall" score: the mean of the three dimensions."""
        return sum(self.scores[d] for d in DIMENSIONS) / len(DIMENSIONS)


@dataclass(frozen=True)
class JudgeFailure:
    """A judgment that did not happen. It carries no score, so nobody can mistake it for one."""

    kind: FailureKind
    message: str
    """One line naming the judge, its plugin and version, and what went wrong."""
    raw: str | None = None
    """The judge's raw reply (or HTTP body) when there was one, for the quarantine file."""


class JudgeError(Exception):
    """Raised by :meth:`Judge.score` when one judgment fails; carries the :class:`JudgeFailure`."""

    def __init__(self, failure: JudgeFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class JudgeItem(NamedTuple):
    """One thing to judge. ``reference`` is task data (e.g. a document's ``meta``)."""

    prompt: list[dict[str, str]] | str
    response: str
    reference: dict[str, Any] | None = None


Result = Verdict | JudgeFailure
OnResult = Callable[[int, Result], None]


@runtime_checkable
class Judge(Protocol):
    """What a judge factory (``phi4_register_judges``) returns.

    ``name`` and ``version`` key the cache: change ``version`` whenever the judge's outputs may
    change (model, rubric), and cached verdicts stop being reused.
    """

    name: str
    version: str

    def score(self, prompt: list[dict[str, str]] | str, response: str, *, reference: dict[str, Any] | None = None) -> Verdict:
        """One verdict, or :class:`JudgeError`. Never a made-up score."""
        ...

    def score_many(self, items: Sequence[JudgeItem], *, on_result: OnResult | None = None) -> list[Result]:
        """One result per item, in order; may run concurrently. ``on_result(i, result)`` is called
        as each finishes (possibly from worker threads), so callers can persist progress."""
        ...


class BaseJudge(ABC):
    """Convenience base: subclasses implement :meth:`score`; failures name ``origin``.

    ``origin`` is the plugin as :class:`phi4_engine.manager.PluginOrigin` prints it, e.g.
    ``plugin 'judges' (phi4-engine 0.1.0)``, so a failure says whose code to look at.
    """

    name: str = ""
    version: str = ""
    origin: str = "unknown plugin"
    concurrency: int = 1

    @abstractmethod
    def score(self, prompt: list[dict[str, str]] | str, response: str, *, reference: dict[str, Any] | None = None) -> Verdict:
        """One verdict, or raise :class:`JudgeError` (via :meth:`failure`)."""

    def failure(self, kind: FailureKind, message: str, raw: str | None = None) -> JudgeError:
        """A :class:`JudgeError` whose message names this judge, its plugin and version."""
        return JudgeError(JudgeFailure(kind, f"judge {self.name!r} ({self.origin}): {kind}: {message}", raw))

    def verdict(self, scores: dict[str, float], raw: str | None = None) -> Verdict:
        return Verdict({d: float(scores[d]) for d in DIMENSIONS}, self.name, self.version, raw)

    def _one(self, item: JudgeItem) -> Result:
        try:
            return self.score(item[0], item[1], reference=item[2] if len(item) > 2 else None)
        except JudgeError as exc:
            return exc.failure
        except EngineError:
            raise  # a configuration problem (missing API key…) stops the run instead
        except Exception as exc:
            return self.failure("exception", f"{type(exc).__name__}: {exc}").failure

    def score_many(self, items: Sequence[JudgeItem], *, on_result: OnResult | None = None) -> list[Result]:
        results: list[Result | None] = [None] * len(items)

        def run(i: int) -> None:
            results[i] = self._one(items[i])
            if on_result is not None:
                on_result(i, results[i])  # type: ignore[arg-type]

        if self.concurrency <= 1 or len(items) <= 1:
            for i in range(len(items)):
                run(i)
        else:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"judge-{self.name}") as pool:
                for future in [pool.submit(run, i) for i in range(len(items))]:
                    future.result()
        return results  # type: ignore[return-value]


def prefer(a: Verdict, b: Verdict) -> int:
    """+1 if ``a`` is the better response, -1 if ``b``, 0 if neither.

    [P4] App. A.2: the positive response has higher accuracy or higher overall score (mean of
    the three dimensions). The paper does not say how the two combine nor what a tie is (FACTS.md:
    tie rule NOT GIVEN). Chosen here: accuracy decides first, because DPO-2's largest slice
    (532K of 850K pairs) is accuracy pairs; equal accuracy falls back to the mean; equal means
    are a tie, and a tie yields no pair (a pair of equals teaches nothing).
    """
    for key in (lambda v: v.scores["accuracy"], lambda v: v.mean):
        if key(a) != key(b):
            return 1 if key(a) > key(b) else -1
    return 0


def canonical_prompt(prompt: list[dict[str, str]] | str) -> list[dict[str, str]]:
    """A plain string is the user turn, so ``"q"`` and ``[{"role": "user", "content": "q"}]`` are
    the same prompt for the cache."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def verdict_key(judge: str, version: str, prompt: list[dict[str, str]] | str, response: str, reference: dict[str, Any] | None = None) -> str:
    """sha256 over canonical JSON of (judge, version, prompt, response, reference).

    The reference is included because a judge may use it (the rule judge's expected answer);
    for a given prompt it is normally fixed, so this only guards against reusing a verdict
    judged against different ground truth.
    """
    payload = [judge, version, canonical_prompt(prompt), response, reference]
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _score_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value <= 5


def _checked(judge: Judge, result: Result) -> Result:
    """A third-party judge's verdict must score every dimension 1–5; otherwise it is malformed."""
    if isinstance(result, JudgeFailure):
        return result
    scores = getattr(result, "scores", None)
    if isinstance(scores, dict) and all(_score_ok(scores.get(d)) for d in DIMENSIONS):
        return result
    origin = getattr(judge, "origin", "unknown plugin")
    return JudgeFailure("malformed", f"judge {judge.name!r} {judge.version} ({origin}): malformed: verdict lacks "
                        f"1-5 scores for {', '.join(DIMENSIONS)}: {scores!r}", None if scores is None else repr(scores))


class VerdictCache:
    """Verdicts on disk (``<dir>/verdicts.jsonl``), failures in ``<dir>/judge-quarantine.jsonl``.

    Only successful verdicts are cached; a failed item is quarantined and asked again by the
    next run (a timeout may pass then), never scored. :meth:`stats` counts this instance's work:
    ``asked`` (sent to the judge) = ``ok`` + ``malformed`` + ``failed`` (timeout, http,
    exception); ``cached`` were answered from disk without asking. One writer per directory
    (rank 0); appends are serialized by a lock because judges call back from worker threads.
    """

    def __init__(self, directory: str | os.PathLike[str], *, filename: str = "verdicts.jsonl",
                 quarantine: str = "judge-quarantine.jsonl") -> None:
        self.dir = Path(directory)
        self.path = self.dir / filename
        self.quarantine_path = self.dir / quarantine
        self._lock = threading.Lock()
        self._file = AppendLog(self.path)
        self._quarantine = AppendLog(self.quarantine_path)
        self._verdicts: dict[str, Verdict] = {}
        for lineno, rec in enumerate(self._file.records, 1):
            try:
                self._verdicts[rec["key"]] = Verdict({d: float(rec["scores"][d]) for d in DIMENSIONS},
                                                     rec["judge"], rec["judge_version"], rec.get("raw"))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.path}:{lineno}: not a verdict record ({type(exc).__name__}: {exc})") from None
        self._file.records = self._quarantine.records = []  # parsed; keep no second copy
        self._counts = {"asked": 0, "cached": 0, "ok": 0, "malformed": 0, "failed": 0}

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, judge: Judge, prompt: list[dict[str, str]] | str, response: str,
            reference: dict[str, Any] | None = None) -> Verdict | None:
        return self._verdicts.get(verdict_key(judge.name, judge.version, prompt, response, reference))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _record(self, key: str, item: JudgeItem, result: Result) -> None:
        with self._lock:
            if isinstance(result, Verdict):
                self._counts["ok"] += 1
                self._verdicts[key] = result
                self._file.append({"key": key, **asdict(result)})
            else:
                self._counts["malformed" if result.kind == "malformed" else "failed"] += 1
                prompt = canonical_prompt(item[0])
                self._quarantine.append({"key": key, "kind": result.kind, "message": result.message,
                                         "raw": result.raw, "prompt": prompt, "response": item[1]})

    def score(self, judge: Judge, items: Sequence[JudgeItem | tuple[Any, ...]]) -> list[Result]:
        """Results for ``items`` in order: cached verdicts, else the judge's (persisted as each
        arrives, so a run killed mid-batch keeps what it paid for). Duplicates are asked once."""
        items = [JudgeItem(*it) for it in items]
        keys = [verdict_key(judge.name, judge.version, it.prompt, it.response, it.reference) for it in items]
        results: list[Result | None] = [None] * len(items)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in self._verdicts:
                results[i] = self._verdicts[key]
                with self._lock:
                    self._counts["cached"] += 1
            else:
                todo.setdefault(key, []).append(i)
        order = list(todo)
        with self._lock:
            self._counts["asked"] += len(order)

        recorded: set[int] = set()

        def done(j: int, result: Result) -> None:
            result = _checked(judge, result)
            with self._lock:
                if j in recorded:
                    return
                recorded.add(j)
            self._record(order[j], items[todo[order[j]][0]], result)

        fresh = judge.score_many([items[todo[k][0]] for k in order], on_result=done) if order else []
        if len(fresh) != len(order):
            raise EngineError(f"judge {judge.name!r} returned {len(fresh)} results for {len(order)} items")
        for j, (key, result) in enumerate(zip(order, fresh)):
            done(j, result)  # a judge that never called on_result is recorded here
            for i in todo[key]:
                results[i] = _checked(judge, result)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._file.close()
        self._quarantine.close()

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
