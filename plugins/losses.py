"""Built-in losses: token cross-entropy for LM stages, DPO-family losses for preference stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.choices import PreferenceLoss
from phi4_engine.spec.base import SpecModel


class CrossEntropySpec(SpecModel):
    kind: Literal["cross-entropy"]


class DPOSigmoidSpec(SpecModel):
    kind: Literal["dpo-sigmoid"]
    beta: float = Field(0.1, gt=0)
    """β: scale of the policy/reference log-ratio margin (the strength of the pull to the reference)."""


class IPOSpec(SpecModel):
    kind: Literal["ipo"]
    beta: float = Field(0.1, gt=0)
    """β: IPO regresses the (per-token averaged) log-ratio margin to 1/(2β)."""


@hookimpl
def phi4_register_losses(register):
    # The LM trainer computes token cross-entropy through torchtitan's CrossEntropyLoss,
    # normalized by the global count of non-ignored tokens; the spec only selects it.
    register("cross-entropy", CrossEntropySpec, lambda s: "cross-entropy")
    # Preference losses are computed by phi4_engine.titan.dpo; the spec selects kind and β.
    register("dpo-sigmoid", DPOSigmoidSpec, lambda s: PreferenceLoss("dpo-sigmoid", s.beta))
    register("ipo", IPOSpec, lambda s: PreferenceLoss("ipo", s.beta))
