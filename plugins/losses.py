"""Built-in losses for LM stages."""

from __future__ import annotations

from typing import Literal

from phi4_engine import hookimpl
from phi4_engine.spec.base import SpecModel


class CrossEntropySpec(SpecModel):
    kind: Literal["cross-entropy"]


@hookimpl
def phi4_register_losses(register):
    # The LM trainer computes token cross-entropy through torchtitan's CrossEntropyLoss,
    # normalized by the global count of non-ignored tokens; the spec only selects it.
    register("cross-entropy", CrossEntropySpec, lambda s: "cross-entropy")
