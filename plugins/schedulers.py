"""Built-in learning-rate schedules: warm-up then cosine, linear, or constant."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.choices import Schedule
from phi4_engine.spec.base import SpecModel


class _WarmupSpec(SpecModel):
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from ~0 to the peak LR."""
    min_lr_factor: float = Field(0.1, ge=0, le=1)
    """Final LR as a fraction of the peak."""


class WarmupCosineSpec(_WarmupSpec):
    kind: Literal["warmup-cosine"]


class WarmupLinearSpec(_WarmupSpec):
    kind: Literal["warmup-linear"]


class ConstantSpec(SpecModel):
    kind: Literal["constant"]
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up before the constant LR."""


@hookimpl
def phi4_register_schedulers(register):
    register("warmup-cosine", WarmupCosineSpec, lambda s: Schedule(s.warmup_steps, "cosine", s.min_lr_factor))
    register("warmup-linear", WarmupLinearSpec, lambda s: Schedule(s.warmup_steps, "linear", s.min_lr_factor))
    register("constant", ConstantSpec, lambda s: Schedule(s.warmup_steps, "none", 1.0))
