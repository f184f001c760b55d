"""Built-in parallel layouts, translated to torchtitan's configs in ``phi4_engine/titan/``.

* ``auto``: FSDP2 over every rank; at paper scale (≥ 14B parameters on more than 8 GPUs of
  one node) tensor parallelism within the node, so each layer's gathered weights and the
  activations fit (the rule is :func:`phi4_engine.titan.layouts.resolve`);
* ``fsdp2``: parameters, gradients and optimizer state sharded over ``shard_degree`` ranks;
* ``hsdp``: ``replicate_degree`` copies, each sharded over ``shard_degree`` ranks (sharding
  traffic stays inside a node or a rack);
* ``fsdp2+tp``: tensor parallelism of ``tp_degree`` (within a node) × FSDP2 over the rest.

Every kind takes the same step options: ``float8`` (torchao recipes; CUDA SM89+ or
``emulate``), ``activation_checkpointing``, ``compile`` and ``mixed_precision``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.choices import Layout
from phi4_engine.spec.base import SpecModel


class Float8Section(SpecModel):
    """Float8 matmuls through torchao (``pip install 'phi4-engine[float8]'``)."""

    recipe: Literal["rowwise", "rowwise_with_gw_hp"] = "rowwise"
    """torchao recipe (torchtitan's two): ``rowwise`` scales per row; ``rowwise_with_gw_hp``
    also keeps the weight gradient's matmul in high precision."""
    emulate: bool = False
    """Emulate float8 (any device, slower): for testing on CPU or GPUs older than SM89."""


class StepOptions(SpecModel):
    """How each step runs, whatever the layout."""

    float8: Float8Section | None = None
    """Float8 linear layers (H100/H200 class GPUs); null: off."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in the backward pass: ``selective`` (per-op: saves matmul outputs
    every other layer op) or ``full`` (whole blocks) trade compute for memory."""
    compile: bool = False
    """``torch.compile`` the model and the loss."""
    mixed_precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """Parameter dtype inside FSDP: ``auto`` = bf16 on CUDA, fp32 on CPU."""

    def options(self) -> dict:
        return {
            "float8": self.float8.recipe if self.float8 else None,
            "float8_emulate": bool(self.float8 and self.float8.emulate),
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "mixed_precision": self.mixed_precision,
        }


class AutoSpec(StepOptions):
    kind: Literal["auto"]


class Fsdp2Spec(StepOptions):
    kind: Literal["fsdp2"]
    shard_degree: int = Field(-1, ge=-1)
    """Ranks a parameter is sharded over (-1: all ranks)."""


class HsdpSpec(StepOptions):
    kind: Literal["hsdp"]
    replicate_degree: int = Field(ge=1)
    """Number of replicas (e.g. nodes)."""
    shard_degree: int = Field(-1, ge=-1)
    """Ranks each replica is sharded over (-1: world size / replicate_degree)."""


class Fsdp2TpSpec(StepOptions):
    kind: Literal["fsdp2+tp"]
    tp_degree: int = Field(ge=2)
    """Tensor-parallel ranks (keep it within a node: at most the GPUs per node)."""
    shard_degree: int = Field(-1, ge=-1)
    """FSDP2 ranks (-1: world size / tp_degree)."""


@hookimpl
def phi4_register_parallelisms(register):
    register("auto", AutoSpec, lambda s: Layout(auto=True, **s.options()))
    register("fsdp2", Fsdp2Spec, lambda s: Layout(dp_shard=s.shard_degree, **s.options()))
    register("hsdp", HsdpSpec, lambda s: Layout(dp_replicate=s.replicate_degree, dp_shard=s.shard_degree, **s.options()))
    register("fsdp2+tp", Fsdp2TpSpec, lambda s: Layout(dp_shard=s.shard_degree, tp=s.tp_degree, **s.options()))
