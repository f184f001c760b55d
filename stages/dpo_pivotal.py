"""dpo-pivotal: DPO round 1 — token-level pairs from Pivotal Token Search ([P4] §4.3, Fig. 4).

Questions with a verifiable answer (a verifier plugin is the oracle) are searched with the policy
— the previous stage's final weights — by :mod:`phi4_engine.pts`: questions whose success rate
lies in ``[p_min, p_max]`` have their sampled responses bisected at the cumulative log-prob
midpoint until single tokens that move p(success) by at least ``p_gap`` are isolated. Each
pivotal token gives a pair (question + prefix, accepted token, rejected token) whose DPO loss
covers only that one token. Questions are searched ``questions_per_round`` at a time (their
rollouts share generation batches) until ``pairs`` pairs exist or the prompts run out.

Under ``<stage>/data/``: ``pts-cache.jsonl`` (every p estimate with its rollouts' first tokens and
outcomes: an interrupted search resumes without repeating rollouts), ``pairs.jsonl`` (prefix
text, tokens, p before/after) and ``pairs-report.json`` (pairs found, rollouts spent, cache
hits, the p-jump histogram; ``phi4-engine pts RUN_DIR`` prints it).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field, model_validator

from phi4_engine import ranks
from phi4_engine.preference import DpoStageSpec, build_then_train, data_dir, load_policy, prompt_batches
from phi4_engine.progress import WorkProgress
from phi4_engine.spec.base import SpecModel, VerifierRef
from phi4_engine.stage import StageContext


class PtsSection(SpecModel):
    """Pivotal Token Search parameters (FACTS.md §4)."""

    rollouts: int = Field(64, ge=1)
    """Completions sampled per p(success | prefix) estimate (paper figure used 529)."""
    p_gap: float = Field(0.2, gt=0, le=1)
    """Minimum change of p(success) for a token to be pivotal."""
    p_min: float = Field(0.2, ge=0, le=1)
    p_max: float = Field(0.8, ge=0, le=1)
    """Only questions with p_min <= p(success | question) <= p_max are searched."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    trajectories: int = Field(2, ge=1)
    """Sampled responses searched per question (failed and successful ones interleaved)."""
    verifier: VerifierRef = Field(default_factory=lambda: {"kind": "math-answer"}, validate_default=True)  # type: ignore[assignment]
    """The oracle: ``math-answer`` (ground truth) or ``python-tests`` (the task's tests, sandboxed)."""
    questions_per_round: int = Field(64, ge=1)
    """Questions searched together (their rollouts share generation batches)."""
    max_rows: int = Field(256, ge=1)
    """Rollouts per generation batch."""

    @model_validator(mode="after")
    def _window(self) -> "PtsSection":
        if self.p_min > self.p_max:
            raise ValueError("p_min must be <= p_max")
        return self


class DpoPivotalSpec(DpoStageSpec):
    """DPO round 1: token-level pairs from Pivotal Token Search."""

    kind: Literal["dpo-pivotal"]
    pts: PtsSection = Field(default_factory=PtsSection)


class DpoPivotalStage:
    distributed = True  # under --nproc: generation dealt over the ranks, DPO on all of them

    def __init__(self, spec: DpoPivotalSpec, ctx: StageContext) -> None:
        self.spec, self.ctx = spec, ctx

    def run(self) -> dict[str, Any]:
        return build_then_train(self.ctx, self.spec, self.search, "pts")

    def search(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from phi4_engine.pts import PTSConfig, questions_from_prompts
        from phi4_engine.titan.rollouts import build_search

        spec, ctx, tok = self.spec, self.ctx, self.ctx.tokenizer
        pts = spec.pts
        config = PTSConfig(
            rollouts=pts.rollouts, p_gap=pts.p_gap, p_min=pts.p_min, p_max=pts.p_max, temperature=pts.temperature,
            top_p=pts.top_p, max_new_tokens=spec.max_new_tokens, seed=ctx.spec.seed, trajectories=pts.trajectories,
            max_rows=pts.max_rows,
        )  # fmt: skip
        verifier = ctx.registry.build("verifier", pts.verifier)
        model = load_policy(ctx, spec.seq_len)
        records: list[dict[str, Any]] = []
        counts = {"too_long": 0}
        bar = WorkProgress(f"{ctx.stage_name}: pivotal token search", total=spec.pairs, unit="pairs")
        with build_search(model, tok, verifier, config, policy_id=ctx.init_weights_sha256,
                          cache_dir=data_dir(ctx)) as search, bar:
            for batch in prompt_batches(ctx, spec, pts.questions_per_round, counts):
                result = search.run(questions_from_prompts(batch, tok))
                new = [pair.record(tok.decode) for pair in result.pairs][: spec.pairs - len(records)]
                records.extend(new)
                report = result.report
                bar.advance(len(new), info=f"{report['questions']} questions, {report['rollouts']} rollouts")
                if len(records) >= spec.pairs:
                    break
            report = {**search.report(), **counts, "pairs_kept": len(records)}
        if ranks.is_main():
            print(format_report(ctx.stage_name, report), file=sys.stderr)
        return records, report


def format_report(stage: str, report: dict[str, Any]) -> str:
    """The search in a few lines: questions, rollouts, cache hits, pairs, the p-jump histogram."""
    hist = report.get("p_jump_histogram", {})
    bars = "\n".join(f"  |Δp| {k}: {v:>5} {'#' * min(v, 60)}" for k, v in sorted(hist.items()) if v)
    return (
        f"{stage}: pivotal token search\n"
        f"  questions {report.get('questions', 0)} (searched {report.get('searched', 0)}, outside the window: "
        f"{report.get('skipped_low', 0)} too hard, {report.get('skipped_high', 0)} too easy)\n"
        f"  rollouts spent {report.get('rollouts', 0)}, estimates from cache {report.get('estimates_cached', 0)} "
        f"(rollouts saved {report.get('rollouts_cached', 0)})\n"
        f"  pivotal tokens {report.get('pivotal_tokens', 0)} (raise p {report.get('pivotal_raise', 0)}, lower p "
        f"{report.get('pivotal_lower', 0)}), pairs {report.get('pairs_kept', report.get('pairs', 0))} "
        f"(no alternative token: {report.get('no_alternative', 0)})\n"
        f"  p-jump histogram of the pivotal tokens:\n{bars or '  (none)'}"
    )
