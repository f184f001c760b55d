"""pretrain: next-token prediction on a weighted mixture of sources, packed to ``seq_len``.

Paper values (FACTS.md §3): seq 4096, ~10T tokens, peak LR 3e-4, weight decay 0.1, linear
warm-up then decay, mixture web 15% / web rewrites 15% / synthetic 40% / code 20% / acquired 10%.
Packed documents do not attend to each other (block-causal attention from their positions).
"""

from __future__ import annotations

from typing import Literal

from phi4_engine.training import LMStage, LMStageSpec


class PretrainSpec(LMStageSpec):
    """Pretraining from scratch on a weighted mixture of text sources."""

    kind: Literal["pretrain"]


class PretrainStage(LMStage):
    pass
