"""Built-in parallel layouts (translated to torchtitan's ParallelismConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.choices import Layout
from phi4_engine.spec.base import SpecModel


class AutoSpec(SpecModel):
    kind: Literal["auto"]


class Fsdp2Spec(SpecModel):
    kind: Literal["fsdp2"]
    shard_degree: int = Field(-1)
    """Ranks a parameter is sharded over (-1: all ranks)."""


@hookimpl
def phi4_register_parallelisms(register):
    # auto: FSDP2 over every rank (one process on CPU); richer layouts come with scale-out.
    register("auto", AutoSpec, lambda s: Layout())
    register("fsdp2", Fsdp2Spec, lambda s: Layout(dp_shard=s.shard_degree))
