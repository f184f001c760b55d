"""midtrain: long-context training from the pretrained weights (FACTS.md §3, midtraining).

4K→16K context (the sequence length is the spec's; full.json uses 4× pretrain), RoPE base
250K, peak LR ÷10, and a mixture of 30% long documents (longer than twice the pretrain length:
natively long first, concatenations as the allowed synthetic fallback) and 70% "recall" data
drawn from the pretrain stage's own sources with their own weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from phi4_engine.errors import SpecError
from phi4_engine.stage import StageContext
from phi4_engine.training import LMStage, LMStageSpec, build_sources


class MidtrainSpec(LMStageSpec):
    """Long-context midtraining: 4K→16K, RoPE base 250K, peak LR ÷10, 30% long / 70% recall."""

    kind: Literal["midtrain"]
    long_fraction: float = Field(0.3, gt=0, lt=1)
    """Token share of long documents; the rest is recall data from the pretrain sources."""
    recall_from: str = "pretrain"
    """Stage whose data sources provide the recall share."""
    long_min_tokens: int | None = Field(None, ge=2)
    """A long document has at least this many tokens (default: twice the recall stage's seq_len)."""


class MidtrainStage(LMStage):
    spec: MidtrainSpec

    def __init__(self, spec: MidtrainSpec, ctx: StageContext) -> None:
        super().__init__(spec, ctx)
        self.long_reports: dict[str, dict[str, int]] = {}

    def _recall_stage(self) -> Any:
        for stage in self.ctx.spec.stages:
            if stage.name == self.spec.recall_from and hasattr(stage, "data"):
                return stage
        raise SpecError(
            f"stage {self.spec.name!r}: recall_from {self.spec.recall_from!r} names no stage with data sources"
        )

    def mixture_sources(self) -> list[tuple[Any, float]]:
        from phi4_engine.data.long import LongDocuments

        recall_stage = self._recall_stage()
        min_tokens = self.spec.long_min_tokens or 2 * recall_stage.seq_len
        long_sources = build_sources(self.ctx, self.spec.data.sources)
        recall_sources = build_sources(self.ctx, recall_stage.data.sources)
        long_total = sum(w for _, w in long_sources)
        recall_total = sum(w for _, w in recall_sources)
        mixture = []
        for source, weight in long_sources:
            wrapped = LongDocuments(source, self.ctx.tokenizer, min_tokens)
            self.long_reports[source.name] = wrapped.report()
            mixture.append((wrapped, self.spec.long_fraction * weight / long_total))
        for source, weight in recall_sources:
            mixture.append((source, (1 - self.spec.long_fraction) * weight / recall_total))
        return mixture

    def run(self) -> dict[str, Any]:
        summary = super().run()
        summary["long_documents"] = self.long_reports
        return summary
