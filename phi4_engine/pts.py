"""Pivotal Token Search ([P4] §4.3, Fig. 4; FACTS.md §4): find the single tokens of a response
that move the chance of success most, and turn each into a one-token preference pair.

``P(prefix)`` is the share of ``rollouts`` completions, sampled from question + prefix, that the
oracle (a verifier) accepts. For a trajectory ``T`` (a response of the policy), Subdivide splits
``T`` where the CUMULATIVE token log-prob (of ``T`` under the policy) reaches half its total
(:func:`split_point`), recursing while the two ends of a piece differ by at least ``p_gap``; a
one-token piece whose ends differ by ``p_gap`` or more is pivotal. Only questions with
``p_min <= P(empty) <= p_max`` are searched.

How it scales: Subdivide needs ``P(pre + L)`` before either half can go on, and both halves need
nothing else, so a piece's two halves are searched side by side. :class:`PivotalTokenSearch` keeps
every open piece of every trajectory of every question and, each round, asks the estimator for
all the prefixes they wait on at once (chunked to ``max_rows`` rollouts per call); rollouts of
different prefixes and questions share generation batches. The result is the same set of pieces
the recursion of FACTS.md §4 yields, in the same order.

Where the trajectories come from: a question's own ``trajectory`` (exact token ids) if it has
one, else ``trajectories`` of the rollouts already sampled for ``P(empty)``, failed and
successful ones interleaved (failed first; :func:`select_trajectories`), so both kinds of pivotal
token (one that lowers P, one that raises it) are looked for.

Pairs (footnote 7: both tokens come from the rollouts already sampled for ``P(pre)``). The prompt
is the question + prefix. A token that RAISES P is ``chosen``; ``rejected`` is the most frequent
first token among the FAILED rollouts from ``pre`` whose first token differs from it. A token that
LOWERS P is ``rejected``; ``chosen`` is the most frequent first token among the SUCCESSFUL
rollouts from ``pre`` that differ from it. Frequency ties go to the token seen first (rollout
order). No such rollout, no pair (counted as ``no_alternative``). Choosing by frequency takes the
alternative the policy itself prefers on the other side of the outcome, which is the contrast DPO
should push on; the alternative's empirical success among those rollouts is recorded with the pair.

Everything works on exact token ids: a prefix is never decoded and re-encoded; text appears only
for the verifier (decode of prefix + completion, inside the estimator) and in the readable pairs.

Determinism: rollout ``r`` of a prefix samples with its own random stream, keyed by
:func:`rollout_keys` ``(seed, question ids, prefix ids, r)``, so which prefixes share a batch (and
whether a previous run had already cached some of them) does not change what is sampled. The one
caveat is floating point: a batch of another shape may round a logit differently by an ulp (more
likely on GPU kernels than on CPU), and a draw that lands exactly on such a boundary picks the
neighbouring token; the cache still never repeats a rollout, and the estimate stays a fair one.

Resume: :class:`PTSCache` appends every estimate (p, each rollout's first token and success, and
the kept trajectories) and every trajectory's log-probs to an fsync'd JSONL, keyed by a hash of
everything that can change them (:func:`estimate_key`); a torn last line is dropped on load. An
interrupted search rerun with the same inputs spends no rollout twice and gives the same result.

This module does not import torch; the model side (batched rollouts through the KV cache,
per-token log-probs) lives in :mod:`phi4_engine.titan.rollouts`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from phi4_engine.errors import DataError
from phi4_engine.rundir import AppendLog

__all__ = [
    "Estimate",
    "LogProbFn",
    "NO_TOKEN",
    "PTSCache",
    "PTSConfig",
    "PTSPair",
    "PTSResult",
    "PivotalToken",
    "PivotalTokenSearch",
    "PrefixRequest",
    "Question",
    "SamplingParams",
    "SuccessEstimator",
    "estimate_key",
    "pick_alternative",
    "questions_from_prompts",
    "rollout_keys",
    "select_trajectories",
    "split_point",
    "uniform",
]

NO_TOKEN = -1
"""The first token of a rollout that had no room to generate (its prefix used the whole budget)."""
_EPS = 1e-9  # p values are multiples of 1/rollouts: 0.7 - 0.5 must count as a jump of 0.2


# -- inputs and the estimator interface ------------------------------------------------------


@dataclass(frozen=True)
class PTSConfig:
    """Search parameters. ``rollouts``, ``temperature``, ``top_p``, ``max_new_tokens`` and
    ``seed`` define the estimate and key the cache; ``max_rows`` only sizes the batches."""

    rollouts: int = 64
    p_gap: float = 0.2
    p_min: float = 0.2
    p_max: float = 0.8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    trajectories: int = 2
    """Responses searched per question when the question brings none (see the module doc)."""
    max_rows: int = 256
    """Rollouts per estimator call (whole prefixes where possible); each call is persisted."""

    def __post_init__(self) -> None:
        if self.rollouts < 1 or self.max_new_tokens < 1 or self.trajectories < 1 or self.max_rows < 1:
            raise ValueError("rollouts, max_new_tokens, trajectories and max_rows must be >= 1")
        if not 0 < self.p_gap <= 1 or not 0 <= self.p_min <= self.p_max <= 1:
            raise ValueError("need 0 < p_gap <= 1 and 0 <= p_min <= p_max <= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.rollouts, self.temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass(frozen=True)
class SamplingParams:
    rollouts: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Question:
    """A question as exact ids (the chat prompt up to and including the assistant header), the
    task data its verifier reads (``meta``), and optionally the response to search."""

    id: str
    prompt_ids: tuple[int, ...]
    meta: Mapping[str, Any] | None = None
    trajectory: tuple[int, ...] | None = None

    @classmethod
    def from_chat(cls, id: str, messages: Sequence[Mapping[str, str]], meta: Mapping[str, Any] | None,
                  tokenizer: Any, trajectory: Sequence[int] | None = None) -> Question:
        ids = tokenizer.encode_chat(list(messages), add_generation_prompt=True)[0]
        return cls(id, tuple(ids), meta, None if trajectory is None else tuple(trajectory))


def questions_from_prompts(prompts: Iterable[Any], tokenizer: Any) -> list[Question]:
    """Questions from chat prompts (anything with ``id``, ``messages`` and ``meta``, such as
    :class:`phi4_engine.preference.Prompt`); the policy's own rollouts are searched."""
    return [Question.from_chat(p.id, p.messages, p.meta, tokenizer) for p in prompts]


@dataclass(frozen=True)
class PrefixRequest:
    """Estimate ``P(prefix)`` for ``question``; ``keep``: also return every rollout's tokens."""

    question: Question
    prefix: tuple[int, ...]
    keep: bool = False


@dataclass(frozen=True)
class Estimate:
    """``rollouts`` outcomes from one prefix: each rollout's first token (the stop id when it
    stopped at once) and whether the verifier accepted it. ``completions`` (every rollout's new
    tokens, stop id excluded) only when asked for; ``kept`` are the trajectories chosen from them."""

    first_tokens: tuple[int, ...]
    successes: tuple[bool, ...]
    completions: tuple[tuple[int, ...], ...] | None = None
    kept: tuple[tuple[int, ...], ...] = ()

    @property
    def p(self) -> float:
        return sum(self.successes) / len(self.successes)


@runtime_checkable
class SuccessEstimator(Protocol):
    """Samples and verifies rollouts. ``verifier_id`` (name@version) keys the cache."""

    verifier_id: str

    def estimate(self, requests: Sequence[PrefixRequest], params: SamplingParams) -> list[Estimate]:
        """One :class:`Estimate` per request, ``params.rollouts`` rollouts each, rollout ``r`` of a
        request drawn with the stream of ``rollout_keys(params.seed, q.prompt_ids, prefix, n)[r]``.

        Length budget: a response, prefix included, has at most ``params.max_new_tokens`` tokens,
        so a rollout from a prefix of ``k`` tokens generates at most ``max_new_tokens - k`` (none
        at all when ``k >= max_new_tokens``: first token :data:`NO_TOKEN`, the prefix alone is
        verified). The trajectory a rollout from the empty prefix produced thus has the same
        budget at each of its prefixes."""
        ...


LogProbFn = Callable[[Sequence[tuple[Sequence[int], Sequence[int]]]], list[list[float]]]
"""``[(prompt_ids, response_ids), ...] -> [[log p(response[i] | prompt + response[:i]), ...], ...]``."""


# -- small pure functions --------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _digest(payload: Any) -> bytes:
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).digest()


def rollout_keys(seed: int, prompt_ids: Sequence[int], prefix: Sequence[int], n: int) -> list[int]:
    """The random-stream key (64-bit) of each of the ``n`` rollouts from question + prefix."""
    base = int.from_bytes(_digest(["pts-rollouts", int(seed), list(prompt_ids), list(prefix)])[:8], "little")
    return [_mix64(base ^ _mix64(r)) for r in range(n)]


def uniform(key: int, step: int) -> float:
    """The uniform draw in [0, 1) of stream ``key`` at ``step`` (counter based, 53 bits)."""
    return (_mix64(key ^ _mix64(step + 0x5851F42D4C957F2D)) >> 11) / float(1 << 53)


def split_point(logps: Sequence[float]) -> int:
    """Where Subdivide splits a piece of ``n >= 2`` tokens: the smallest ``k`` whose cumulative
    log-prob ``sum(logps[:k])`` reaches half the piece's total, clamped to ``1..n-1`` so both
    halves are non-empty. A piece the policy is certain of (total 0) splits at ``n // 2``."""
    n = len(logps)
    if n < 2:
        raise ValueError("split_point needs a piece of at least 2 tokens")
    total = sum(logps)
    if total >= 0:
        return n // 2
    cumulative = 0.0
    for k, value in enumerate(logps, 1):
        cumulative += value
        if cumulative <= total / 2:  # log-probs are <= 0: "reaches half" = at or below it
            return min(max(k, 1), n - 1)
    return n - 1


def select_trajectories(successes: Sequence[bool], k: int) -> list[int]:
    """Indices of ``k`` rollouts to search: failed and successful interleaved, failed first,
    each in rollout order (fewer if there are fewer rollouts)."""
    failed = [i for i, ok in enumerate(successes) if not ok]
    passed = [i for i, ok in enumerate(successes) if ok]
    order = [i for pair in zip(failed, passed) for i in pair]
    order += failed[len(passed):] + passed[len(failed):]
    return order[:k]


def pick_alternative(estimate: Estimate, token: int, *, success: bool) -> tuple[int, int, int] | None:
    """The most frequent first token ``!= token`` among the rollouts whose outcome is
    ``success`` (ties: first seen), as ``(token, rollouts starting with it, of which successes)``
    over ALL rollouts of the estimate; None when there is none."""
    counts: dict[int, int] = {}
    for first, ok in zip(estimate.first_tokens, estimate.successes):
        if ok == success and first != token and first != NO_TOKEN:
            counts[first] = counts.get(first, 0) + 1  # dicts keep first-seen order for ties
    if not counts:
        return None
    best = max(counts, key=lambda t: counts[t])  # max returns the first maximal key
    starts = [ok for first, ok in zip(estimate.first_tokens, estimate.successes) if first == best]
    return best, len(starts), sum(starts)


def estimate_key(*, policy_id: str, verifier_id: str, params: SamplingParams, question: Question,
                 prefix: Sequence[int], keep: int) -> str:
    """sha256 of everything that decides an estimate: the policy's weights id, the verifier and
    its version, the sampling parameters (rollouts, temperature, top_p, max_new_tokens, seed),
    the question's ids and task data, the prefix ids, and how many trajectories are kept."""
    return _digest([
        "pts-estimate", policy_id, verifier_id, params.rollouts, params.temperature, params.top_p,
        params.max_new_tokens, params.seed, list(question.prompt_ids), question.meta, list(prefix), keep,
    ]).hex()  # fmt: skip


def _logps_key(policy_id: str, prompt: Sequence[int], response: Sequence[int]) -> str:
    return _digest(["pts-logps", policy_id, list(prompt), list(response)]).hex()


def _jump(a: float, b: float) -> float:
    return abs(a - b) + _EPS


def _bin(jump: float) -> str:
    lo = min(int((jump - _EPS) * 10 + _EPS), 9)
    return f"{lo / 10:.1f}-{(lo + 1) / 10:.1f}"


# -- the persistent memo ---------------------------------------------------------------------


class PTSCache:
    """``<directory>/<filename>``: one JSON record per line, appended, flushed and fsync'd.

    Estimates: ``{"key", "kind": "estimate", "question", "prefix_len", "first", "success",
    "kept"}``; log-probs: ``{"key", "kind": "logps", "logps"}``. A crash leaves whole lines plus
    at most one torn last line, which loading cuts off. One writer per file.
    """

    def __init__(self, directory: str | os.PathLike[str], filename: str = "pts-cache.jsonl", *, write: bool = True) -> None:
        self.path = Path(directory) / filename
        self.estimates: dict[str, Estimate] = {}
        self.logps: dict[str, list[float]] = {}
        self._log = AppendLog(self.path, write=write)  # write=False: a reader rank under --nproc
        for lineno, rec in enumerate(self._log.records, 1):
            try:
                if rec["kind"] == "estimate":
                    self.estimates[rec["key"]] = Estimate(
                        tuple(int(t) for t in rec["first"]), tuple(bool(s) for s in rec["success"]),
                        None, tuple(tuple(int(t) for t in k) for k in rec["kept"]),
                    )  # fmt: skip
                elif rec["kind"] == "logps":
                    self.logps[rec["key"]] = [float(x) for x in rec["logps"]]
                else:
                    raise ValueError(f"unknown kind {rec['kind']!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{self.path}:{lineno}: not a PTS cache record ({type(exc).__name__}: {exc})") from None
        self._log.records = []  # parsed above; keep no second copy

    def put_estimates(self, items: Sequence[tuple[str, str, int, Estimate]]) -> None:
        """Persist ``(key, question id, prefix length, estimate)`` records with one fsync."""
        records = []
        for key, qid, prefix_len, est in items:
            self.estimates[key] = est
            records.append({"key": key, "kind": "estimate", "question": qid, "prefix_len": prefix_len,
                            "first": list(est.first_tokens), "success": [int(s) for s in est.successes],
                            "kept": [list(k) for k in est.kept]})
        self._log.extend(records)

    def put_logps(self, items: Sequence[tuple[str, list[float]]]) -> None:
        for key, values in items:
            self.logps[key] = values
        self._log.extend([{"key": key, "kind": "logps", "logps": values} for key, values in items])

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> PTSCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PivotalToken:
    question_id: str
    trajectory: int
    """Index of the searched response among the question's trajectories."""
    position: int
    """Index of the token in the response (= prefix length)."""
    prefix: tuple[int, ...]
    token: int
    p_before: float
    p_after: float


@dataclass(frozen=True)
class PTSPair:
    """A one-token preference pair: after ``question_ids + prefix_ids``, ``chosen`` over
    ``rejected``. ``alternative`` = (token, rollouts from the prefix starting with it, of which
    successes) for the token taken from the rollouts; ``p_alternative`` = P(prefix + it) when
    the search happened to estimate it."""

    question_id: str
    question_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    chosen_id: int
    rejected_id: int
    p_before: float
    p_after: float
    pivotal: str  # "chosen" (the pivotal token raises P) | "rejected" (it lowers P)
    alternative: tuple[int, int, int]
    p_alternative: float | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return [*self.question_ids, *self.prefix_ids]

    def record(self, decode: Callable[[Sequence[int]], str] | None = None) -> dict[str, Any]:
        """A ``pairs.jsonl`` line (``prompt_ids``/``chosen_ids``/``rejected_ids`` as
        :func:`phi4_engine.preference.load_pairs` reads them) plus readable fields."""
        token, count, wins = self.alternative
        rec: dict[str, Any] = {
            "id": f"{self.question_id}@{len(self.prefix_ids)}", "question_id": self.question_id,
            "prompt_ids": self.prompt_ids, "chosen_ids": [self.chosen_id], "rejected_ids": [self.rejected_id],
            "prefix_ids": list(self.prefix_ids), "chosen_id": self.chosen_id, "rejected_id": self.rejected_id,
            "pivotal": self.pivotal, "p_before": self.p_before, "p_after": self.p_after,
            "alternative_id": token, "alternative_rollouts": count, "alternative_successes": wins,
            "p_alternative": self.p_alternative,
        }  # fmt: skip
        if decode is not None:
            rec["prefix_text"] = decode(self.prefix_ids)
            rec["chosen_text"] = decode([self.chosen_id])
            rec["rejected_text"] = decode([self.rejected_id])
        return rec


@dataclass
class PTSResult:
    pivotal: list[PivotalToken]
    pairs: list[PTSPair]
    report: dict[str, Any]


# -- the search ------------------------------------------------------------------------------


@dataclass
class _Walk:
    """One trajectory being subdivided: open pieces ``(a, b)`` over ``tokens`` and finished ones."""

    question: Question
    index: int
    tokens: tuple[int, ...]
    logps: list[float] | None = None
    open: list[tuple[int, int]] = field(default_factory=list)
    leaves: list[tuple[int, int]] = field(default_factory=list)


class PivotalTokenSearch:
    """Runs PTS over many questions at once (see the module docstring).

    ``estimator`` samples and verifies rollouts (:class:`SuccessEstimator`); ``logprobs`` gives
    the policy's per-token log-probs of a response (:data:`LogProbFn`); ``policy_id`` names the
    weights (e.g. their sha256) for the cache; ``cache`` a :class:`PTSCache` or its directory.
    Counters accumulate over :meth:`run` calls; :meth:`report` returns them.
    """

    def __init__(self, estimator: SuccessEstimator, logprobs: LogProbFn, config: PTSConfig | None = None, *,
                 policy_id: str, cache: PTSCache | str | os.PathLike[str] | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.estimator, self.logprobs = estimator, logprobs
        self.config = config or PTSConfig()
        self.policy_id = policy_id
        self.cache = cache if isinstance(cache, PTSCache) or cache is None else PTSCache(cache)
        self.progress = progress
        self._memo: dict[str, Estimate] = {}
        self._counts = dict.fromkeys([
            "questions", "searched", "skipped_low", "skipped_high", "trajectories", "empty_trajectories",
            "duplicate_trajectories", "estimates", "estimates_cached", "estimates_fresh", "memo_hits",
            "rollouts", "rollouts_cached", "estimator_calls", "logprob_calls", "logps_cached", "rounds",
            "leaves", "pivotal_tokens", "pivotal_raise", "pivotal_lower", "pairs", "no_alternative",
            "duplicate_pairs",
        ], 0)  # fmt: skip
        self._pivotal_hist: dict[str, int] = {_bin(i / 10 + 0.05): 0 for i in range(10)}
        self._leaf_hist: dict[str, int] = dict(self._pivotal_hist)

    def close(self) -> None:
        """Close the cache file (the search keeps working without persisting)."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self) -> PivotalTokenSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- P lookups ---------------------------------------------------------------------------

    def _key(self, question: Question, prefix: Sequence[int]) -> str:
        keep = self.config.trajectories if not prefix and question.trajectory is None else 0
        return estimate_key(policy_id=self.policy_id, verifier_id=self.estimator.verifier_id,
                            params=self.config.sampling, question=question, prefix=prefix, keep=keep)

    def _known(self, question: Question, prefix: Sequence[int]) -> Estimate | None:
        return self._memo.get(self._key(question, prefix))

    def _resolve(self, requests: list[PrefixRequest]) -> None:
        """Fill the memo for ``requests``: from the cache file, else the estimator in chunks of
        ``max_rows`` rollouts, each chunk persisted before the next is sampled."""
        todo: list[tuple[str, PrefixRequest]] = []
        seen: set[str] = set()
        for req in requests:
            key = self._key(req.question, req.prefix)
            if key in self._memo or key in seen:
                self._counts["memo_hits"] += 1
                continue
            seen.add(key)
            self._counts["estimates"] += 1
            if self.cache is not None and key in self.cache.estimates:
                self._memo[key] = self.cache.estimates[key]
                self._counts["estimates_cached"] += 1
                self._counts["rollouts_cached"] += len(self._memo[key].successes)
            else:
                todo.append((key, req))
        per_call = max(1, self.config.max_rows // self.config.rollouts)
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            estimates = self.estimator.estimate([req for _, req in chunk], self.config.sampling)
            if len(estimates) != len(chunk):
                raise RuntimeError(f"PTS: estimator returned {len(estimates)} estimates for {len(chunk)} prefixes")
            self._counts["estimator_calls"] += 1
            fresh = []
            for (key, req), est in zip(chunk, estimates):
                if len(est.successes) != self.config.rollouts or len(est.first_tokens) != self.config.rollouts:
                    raise RuntimeError(f"PTS: estimator returned {len(est.successes)} rollouts, asked for {self.config.rollouts}")
                kept: tuple[tuple[int, ...], ...] = ()
                if req.keep:
                    if est.completions is None:
                        raise RuntimeError("PTS: estimator returned no completions for a request with keep=True")
                    idx = select_trajectories(est.successes, self.config.trajectories)
                    kept = tuple(tuple(est.completions[i]) for i in idx)
                est = Estimate(tuple(est.first_tokens), tuple(bool(s) for s in est.successes), None, kept)
                self._memo[key] = est
                fresh.append((key, req.question.id, len(req.prefix), est))
            self._counts["estimates_fresh"] += len(fresh)
            self._counts["rollouts"] += sum(len(e.successes) for *_, e in fresh)
            if self.cache is not None:
                self.cache.put_estimates(fresh)
            if self.progress is not None:
                self.progress(self.report())

    def _resolve_logps(self, walks: list[_Walk]) -> None:
        todo = []
        for walk in walks:
            key = _logps_key(self.policy_id, walk.question.prompt_ids, walk.tokens)
            if self.cache is not None and key in self.cache.logps:
                walk.logps = self.cache.logps[key]
                self._counts["logps_cached"] += 1
            else:
                todo.append((key, walk))
        if not todo:
            return
        values = self.logprobs([(w.question.prompt_ids, w.tokens) for _, w in todo])
        self._counts["logprob_calls"] += 1
        for (_, walk), lp in zip(todo, values):
            if len(lp) != len(walk.tokens):
                raise RuntimeError(f"PTS: log-prob function returned {len(lp)} values for {len(walk.tokens)} tokens")
            walk.logps = [float(x) for x in lp]
        if self.cache is not None:
            self.cache.put_logps([(key, walk.logps) for key, walk in todo])  # type: ignore[misc]

    # -- the rounds --------------------------------------------------------------------------

    def _advance(self, walk: _Walk) -> list[int]:
        """Split every open piece whose midpoint P is known; the boundaries still needed."""
        p = self.config.p_gap
        pending, needed, queue = [], [], list(walk.open)
        while queue:
            a, b = queue.pop(0)
            ea, eb = self._known(walk.question, walk.tokens[:a]), self._known(walk.question, walk.tokens[:b])
            if ea is None or eb is None:
                needed += [i for i, e in ((a, ea), (b, eb)) if e is None]
                pending.append((a, b))
            elif b - a <= 1 or _jump(ea.p, eb.p) < p:
                walk.leaves.append((a, b))
            else:
                m = a + split_point(walk.logps[a:b])  # type: ignore[index]
                if self._known(walk.question, walk.tokens[:m]) is None:
                    needed.append(m)
                    pending.append((a, b))
                else:
                    queue[:0] = [(a, m), (m, b)]
        walk.open = pending
        return needed

    def run(self, questions: Iterable[Question]) -> PTSResult:
        """Search ``questions`` together; their pivotal tokens and pairs (question order, then
        trajectory, then position) and the cumulative :meth:`report`."""
        questions = list(questions)
        self._counts["questions"] += len(questions)
        cfg = self.config
        self._resolve([PrefixRequest(q, (), keep=q.trajectory is None) for q in questions])
        self._counts["rounds"] += 1
        walks: list[_Walk] = []
        for q in questions:
            root = self._known(q, ())
            assert root is not None
            if root.p < cfg.p_min - _EPS:
                self._counts["skipped_low"] += 1
                continue
            if root.p > cfg.p_max + _EPS:
                self._counts["skipped_high"] += 1
                continue
            self._counts["searched"] += 1
            candidates = [q.trajectory] if q.trajectory is not None else list(root.kept)
            seen: set[tuple[int, ...]] = set()
            for i, tokens in enumerate(candidates):
                if not tokens:
                    self._counts["empty_trajectories"] += 1
                elif tokens in seen:
                    self._counts["duplicate_trajectories"] += 1
                else:
                    seen.add(tokens)
                    walks.append(_Walk(q, i, tuple(tokens), open=[(0, len(tokens))]))
        self._counts["trajectories"] += len(walks)
        self._resolve_logps(walks)
        while True:
            requests = []
            for walk in walks:
                for m in self._advance(walk):
                    requests.append(PrefixRequest(walk.question, walk.tokens[:m]))
            if not requests:
                break
            self._resolve(requests)
            self._counts["rounds"] += 1
        return self._collect(walks)

    def _collect(self, walks: list[_Walk]) -> PTSResult:
        pivotal, pairs, seen = [], [], set()
        for walk in walks:
            for a, b in sorted(walk.leaves):
                before = self._known(walk.question, walk.tokens[:a])
                after = self._known(walk.question, walk.tokens[:b])
                assert before is not None and after is not None
                jump = _jump(before.p, after.p)
                self._counts["leaves"] += 1
                self._leaf_hist[_bin(jump)] += 1
                if b - a != 1 or jump < self.config.p_gap:
                    continue
                token = walk.tokens[a]
                piv = PivotalToken(walk.question.id, walk.index, a, walk.tokens[:a], token, before.p, after.p)
                pivotal.append(piv)
                self._counts["pivotal_tokens"] += 1
                self._pivotal_hist[_bin(jump)] += 1
                raises = after.p > before.p
                self._counts["pivotal_raise" if raises else "pivotal_lower"] += 1
                alt = pick_alternative(before, token, success=not raises)
                if alt is None:
                    self._counts["no_alternative"] += 1
                    continue
                chosen, rejected = (token, alt[0]) if raises else (alt[0], token)
                ident = (walk.question.id, piv.prefix, chosen, rejected)
                if ident in seen:
                    self._counts["duplicate_pairs"] += 1
                    continue
                seen.add(ident)
                known_alt = self._known(walk.question, piv.prefix + (alt[0],))
                pairs.append(PTSPair(
                    walk.question.id, walk.question.prompt_ids, piv.prefix, chosen, rejected, before.p, after.p,
                    "chosen" if raises else "rejected", alt, None if known_alt is None else known_alt.p,
                ))  # fmt: skip
                self._counts["pairs"] += 1
        return PTSResult(pivotal, pairs, self.report())

    def report(self) -> dict[str, Any]:
        """Counters so far: questions (searched, skipped by the window), trajectories, estimates
        (cached/fresh), rollouts spent (and saved by the cache), pivotal tokens, pairs, the
        histogram of |delta p| of the pivotal tokens and of all final pieces (bins of 0.1)."""
        out: dict[str, Any] = dict(self._counts)
        out["config"] = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        out["p_jump_histogram"] = dict(self._pivotal_hist)
        out["leaf_jump_histogram"] = dict(self._leaf_hist)
        spent = self._counts["rollouts"] + self._counts["rollouts_cached"]
        out["rollouts_per_question"] = round(spent / self._counts["questions"], 1) if self._counts["questions"] else None
        return out
