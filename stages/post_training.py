"""Spec models of the stages after pretrain whose training loops are not built yet.

They validate (so ``specs/full.json`` carries every paper value today) but refuse to run with a
clear message. Each moves to its own module when its issue lands:
dpo-pivotal (#6).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from phi4_engine.errors import EngineError
from phi4_engine.preference import DpoStageSpec
from phi4_engine.spec.base import SpecModel


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


class DpoPivotalSpec(DpoStageSpec):
    """DPO round 1: token-level pairs from Pivotal Token Search."""

    kind: Literal["dpo-pivotal"]
    pts: PtsSection = Field(default_factory=PtsSection)


class NotRunnableYet:
    def __init__(self, spec: Any, ctx: Any, issue: int) -> None:
        self.spec, self.issue = spec, issue

    def run(self) -> dict[str, Any]:
        raise EngineError(
            f"stage {self.spec.name!r} (kind {self.spec.kind}) validates but cannot run in this "
            f"version; its training loop is tracked in issue #{self.issue}"
        )


STAGE_KINDS = {
    "dpo-pivotal": (DpoPivotalSpec, 6),
}
