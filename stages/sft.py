"""sft: supervised fine-tuning on ChatML conversations (FACTS.md §3, SFT).

Each conversation is rendered with Phi-4's template
(``<|im_start|>role<|im_sep|>content<|im_end|>``), conversations are packed to ``seq_len``
without attending to each other, and the loss covers assistant tokens only (their content and
closing ``<|im_end|>``). full.json: LR 1e-6, ~8B tokens.
"""

from __future__ import annotations

from typing import Literal

from phi4_engine.training import LMStage, LMStageSpec


class SftSpec(LMStageSpec):
    """Supervised fine-tuning on chat records, loss on assistant tokens only."""

    kind: Literal["sft"]


class SftStage(LMStage):
    chat = True
