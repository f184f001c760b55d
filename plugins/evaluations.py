"""Built-in evaluations: held-out loss at given lengths, and task accuracy by greedy decoding."""

from __future__ import annotations

import weakref
from typing import Any, Literal

from pydantic import Field

from phi4_engine import hookimpl, ranks
from phi4_engine.errors import EngineError
from phi4_engine.spec.base import DataSourceRef, JudgeRef, SpecModel, VerifierRef


class _EvalSpec(SpecModel):
    name: str = ""
    """Key of this evaluation's results (defaults to the kind)."""


class HeldoutLossSpec(_EvalSpec):
    """Mean next-token loss on held-out documents packed to each length."""

    kind: Literal["heldout-loss"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Held-out documents (not used for training)."""
    lengths: list[int] = Field(min_length=1)
    """Sequence lengths to evaluate at, e.g. [4096, 16384]."""
    sequences: int = Field(4, ge=1)
    """Sequences per length."""


class HeldoutLoss:
    def __init__(self, spec: HeldoutLossSpec, ctx: Any) -> None:
        self.spec = spec
        self.tokenizer = ctx.tokenizer
        self.source = ctx.build_source(spec.source)
        self.max_seq_len = max(spec.lengths)

    def _stream(self, tokens_needed: int) -> list[int]:
        stream: list[int] = []
        for doc in self.source.documents():
            stream += self.tokenizer.encode(doc.text) + [self.tokenizer.eos_id]
            if len(stream) >= tokens_needed:
                return stream
        raise ValueError(f"held-out source {self.source.name!r} has only {len(stream)} tokens; {tokens_needed} needed")

    def run(self, model: Any) -> dict[str, float]:
        import torch  # plugins load with every CLI call; torch only when evaluating

        out = {}
        device = next(model.parameters()).device  # a GPU when there is one (load_model)
        for length in self.spec.lengths:
            stream = self._stream(self.spec.sequences * (length + 1))
            chunks = torch.tensor(stream[: self.spec.sequences * (length + 1)], device=device).view(self.spec.sequences, length + 1)
            losses = []
            for row in chunks:
                with torch.no_grad():
                    logits = model(row[None, :-1])
                losses.append(torch.nn.functional.cross_entropy(logits[0].float(), row[1:]).item())
            out[f"loss@{length}"] = sum(losses) / len(losses)
        return out


def chat_problems(source: Any, count: int, evaluation: str) -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
    """The first ``count`` chat records of ``source`` as (conversation without the answer, meta)."""
    out = []
    for doc in source.documents():
        if doc.messages is None or not doc.meta:
            raise ValueError(f"{evaluation} needs chat records with task meta; {doc.id} has none")
        out.append(([m for m in doc.messages if m["role"] != "assistant"], doc.meta))
        if len(out) == count:
            break
    return out


# Greedy answers per model: two evaluations of one model on the same problems (accuracy and a
# judge's score, say) decode once. Greedy decoding of the same prompts in the same batch is
# deterministic, so sharing changes no number.
_ANSWERS: "weakref.WeakKeyDictionary[Any, dict[Any, list[str]]]" = weakref.WeakKeyDictionary()


def greedy_answers(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    from phi4_engine.titan.generate import Generator

    prompts = [tokenizer.encode_chat(messages, add_generation_prompt=True)[0] for messages in conversations]
    memo = _ANSWERS.setdefault(model, {})
    key = (tuple(map(tuple, prompts)), max_new_tokens)
    if key not in memo:
        generator = Generator(model, eos_ids={tokenizer.im_end_id, tokenizer.eos_id}, pad_id=tokenizer.pad_id)
        # Under --nproc each rank answers its share. Greedy decoding does not depend on the batch
        # beyond float rounding (a near-tie between two tokens can resolve differently).
        answers = ranks.split_work(prompts, lambda share: generator.generate(share, max_new_tokens=max_new_tokens))
        memo[key] = [tokenizer.decode(o) for o in answers]
    return list(memo[key])


class _GreedyChatEvaluation:
    """What the chat evaluations share: held-out problems from a source, answered greedily."""

    name = ""

    def __init__(self, spec: Any, ctx: Any) -> None:
        self.spec = spec
        self.tokenizer = ctx.tokenizer
        self.source = ctx.build_source(spec.source)
        self.max_seq_len = 1024
        if hasattr(spec, "verifier"):
            self.verifier = ctx.registry.build("verifier", spec.verifier)

    def answers(self, model: Any) -> tuple[list[tuple[list[dict[str, str]], dict[str, Any]]], list[str]]:
        problems = chat_problems(self.source, self.spec.problems, self.name)
        return problems, greedy_answers(model, self.tokenizer, [p for p, _ in problems], self.spec.max_new_tokens)


class TaskAccuracySpec(_EvalSpec):
    """Share of held-out problems whose greedy answer is right."""

    kind: Literal["task-accuracy"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Chat records (user question, assistant answer) with ``meta.answer``, e.g. synthetic-arithmetic in chat format."""
    problems: int = Field(50, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    verifier: VerifierRef = Field(default_factory=lambda: {"kind": "math-answer"}, validate_default=True)  # type: ignore[assignment]
    """How an answer is checked: ``math-answer`` (normalized final answer against
    ``meta.answer``) or ``python-tests`` (the code passes the task's tests in the sandbox)."""


class TaskAccuracy(_GreedyChatEvaluation):
    name = "task-accuracy"

    def run(self, model: Any) -> dict[str, float]:
        problems, answers = self.answers(model)
        verdicts = ranks.split_work([(meta, answer) for answer, (_, meta) in zip(answers, problems)], self.verifier.verify_many)
        return {"accuracy": sum(verdicts) / len(problems), "problems": float(len(problems))}


class JudgeScoreSpec(_EvalSpec):
    """Mean judge scores (accuracy, style, detail, and their mean) of greedy answers to held-out prompts."""

    kind: Literal["judge-score"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Chat records with task meta (what the judge may compare against)."""
    problems: int = Field(50, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    judge: JudgeRef = Field(default_factory=lambda: {"kind": "rule"}, validate_default=True)  # type: ignore[assignment]


class JudgeScore(_GreedyChatEvaluation):
    """A failed judgment is counted (``failed``) and left out of the means, never scored; an
    evaluation where every judgment failed is an error."""

    name = "judge-score"

    def __init__(self, spec: JudgeScoreSpec, ctx: Any) -> None:
        super().__init__(spec, ctx)
        self.judge = ctx.registry.build("judge", spec.judge)

    def run(self, model: Any) -> dict[str, float]:
        from phi4_engine.judging import DIMENSIONS, JudgeItem, Verdict

        problems, answers = self.answers(model)
        results = ranks.split_work([JudgeItem(p, a, meta) for a, (p, meta) in zip(answers, problems)], self.judge.score_many)
        verdicts = [r for r in results if isinstance(r, Verdict)]
        if not verdicts:
            raise EngineError(f"judge-score: every judgment failed, e.g. {results[0].message}")
        out = {d: sum(v.scores[d] for v in verdicts) / len(verdicts) for d in DIMENSIONS}
        out["mean"] = sum(v.mean for v in verdicts) / len(verdicts)
        out["judged"] = float(len(verdicts))
        out["failed"] = float(len(results) - len(verdicts))
        return out


class RefusalRatesSpec(_EvalSpec):
    """SimpleQA's split ([P4] Fig. 6) on held-out bogus and answerable questions: the share
    correct / incorrect / not attempted (a refusal) of each kind, from greedy answers."""

    kind: Literal["refusal-rates"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Chat records whose ``meta.bogus`` says whether the question can be answered (e.g.
    ``synthetic-refusal``); answerable ones carry ``meta.answer`` for the verifier."""
    problems: int = Field(100, ge=2)
    max_new_tokens: int = Field(64, ge=1)
    refusal_prefix: str = "I cannot answer"
    """An answer that starts with this (after whitespace) is a refusal: not attempted."""
    verifier: VerifierRef = Field(default_factory=lambda: {"kind": "math-answer"}, validate_default=True)  # type: ignore[assignment]


class RefusalRates(_GreedyChatEvaluation):
    name = "refusal-rates"

    def run(self, model: Any) -> dict[str, float]:
        problems, answers = self.answers(model)
        if any("bogus" not in meta for _, meta in problems):
            raise ValueError("refusal-rates needs records whose meta says 'bogus': true/false (e.g. synthetic-refusal)")
        counts = {k: 0 for k in ("bogus", "bogus_not_attempted", "answerable", "answerable_correct", "answerable_not_attempted")}
        checks = []
        for answer, (_, meta) in zip(answers, problems):
            refused = answer.lstrip().startswith(self.spec.refusal_prefix)
            group = "bogus" if meta["bogus"] else "answerable"
            counts[group] += 1
            counts[f"{group}_not_attempted"] += refused
            if group == "answerable" and not refused:
                checks.append((meta, answer))
        counts["answerable_correct"] = sum(ranks.split_work(checks, self.verifier.verify_many))
        bogus, answerable = max(counts["bogus"], 1), max(counts["answerable"], 1)
        return {
            "bogus_not_attempted": counts["bogus_not_attempted"] / bogus,
            "bogus_incorrect": 1 - counts["bogus_not_attempted"] / bogus,
            "answerable_correct": counts["answerable_correct"] / answerable,
            "answerable_not_attempted": counts["answerable_not_attempted"] / answerable,
            "answerable_incorrect": 1 - (counts["answerable_correct"] + counts["answerable_not_attempted"]) / answerable,
            "bogus": float(counts["bogus"]),
            "answerable": float(counts["answerable"]),
        }


@hookimpl
def phi4_register_evaluations(register):
    register("heldout-loss", HeldoutLossSpec, HeldoutLoss)
    register("task-accuracy", TaskAccuracySpec, TaskAccuracy)
    register("judge-score", JudgeScoreSpec, JudgeScore)
    register("refusal-rates", RefusalRatesSpec, RefusalRates)
