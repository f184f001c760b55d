"""pretrain: next-token prediction on a weighted mixture of sources, packed to ``seq_len``.

Paper values (FACTS.md §3): seq 4096, ~10T tokens, peak LR 3e-4, weight decay 0.1, linear
warm-up then decay, mixture web 15% / web rewrites 15% / synthetic 40% / code 20% / acquired 10%.
"""

from __future__ import annotations

from typing import Any, Literal

from phi4_engine.stage import StageContext
from phi4_engine.training import LMStageSpec, build_sources, run_lm_stage


class PretrainSpec(LMStageSpec):
    """Pretraining from scratch (or from ``init`` weights of an earlier stage)."""

    kind: Literal["pretrain"]


class PretrainStage:
    def __init__(self, spec: PretrainSpec, ctx: StageContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loaders: list[Any] = []

    def make_loader(self, dp_rank: int, dp_world_size: int, seq_len: int, batch_size: int) -> Any:
        from phi4_engine.data.mixture import MixtureLoader

        loader = MixtureLoader(
            build_sources(self.ctx, self.spec.data.sources),
            self.ctx.tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
        )
        self.loaders.append(loader)
        return loader

    def run(self) -> dict[str, Any]:
        summary = run_lm_stage(self.ctx, self.spec, self.make_loader)
        if self.loaders:
            summary["data"] = self.loaders[-1].stats()
        return summary
