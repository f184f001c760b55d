"""Built-in tokenizer kinds: ``phi4`` (cl100k_base + Phi-4 specials) and ``phi4-mini``.

Registered through the ``phi4_engine`` entry-point group like any third-party plugin. The
factories are cheap after the first call: the cl100k rank table is cached per process.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.spec.base import SpecModel
from phi4_engine.tokenizer import build_phi4, build_phi4_mini


class Phi4TokenizerSpec(SpecModel):
    """Phi-4's tokenizer: cl100k_base (100,256 ranks) + 96 specials, vocab 100,352."""

    kind: Literal["phi4"] = "phi4"
    """Tokenizer kind."""


class Phi4MiniTokenizerSpec(SpecModel):
    """The first ``vocab_ranks`` cl100k ranks + Phi-4's 96 specials, for fast CPU runs."""

    kind: Literal["phi4-mini"] = "phi4-mini"
    """Tokenizer kind."""
    vocab_ranks: int = Field(8192, ge=256, le=100256)
    """How many cl100k ranks to keep (ids below it equal cl100k's); vocab size is this + 96."""


@hookimpl
def phi4_register_tokenizers(register) -> None:
    """Register ``phi4`` and ``phi4-mini``."""
    register("phi4", Phi4TokenizerSpec, lambda spec: build_phi4())
    register("phi4-mini", Phi4MiniTokenizerSpec, lambda spec: build_phi4_mini(spec.vocab_ranks))
