"""What a spec chose, as plain values: LR schedule, parallel layout, preference loss.

Plugins' factories return these; ``phi4_engine.titan`` translates them into torchtitan's
configs, so nothing outside ``titan/`` needs torchtitan's types.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to the peak LR, then decay of ``decay_type`` down to ``min_lr_factor``·peak."""

    warmup_steps: int
    decay_type: str  # "cosine" | "linear" | "none"
    min_lr_factor: float


@dataclass(frozen=True)
class Layout:
    """How ranks split the work and how each step runs (translated in ``phi4_engine.titan``).

    ``dp_replicate`` × ``dp_shard`` × ``tp`` = world size (``dp_shard`` -1: whatever is left).
    ``auto`` = decide from the world size and the model size when the run starts.
    """

    dp_shard: int = -1
    tp: int = 1
    dp_replicate: int = 1
    auto: bool = False
    float8: str | None = None
    """None, or a torchao float8 recipe: ``rowwise`` | ``rowwise_with_gw_hp``."""
    float8_emulate: bool = False
    """Emulate float8 arithmetic (any device, slower): for testing on CPU or older GPUs."""
    activation_checkpointing: str = "none"  # "none" | "selective" | "full"
    compile: bool = False
    mixed_precision: str = "auto"
    """Parameter dtype inside FSDP: ``bfloat16``, ``float32``, or ``auto`` (bf16 on CUDA, fp32 on CPU)."""


@dataclass(frozen=True)
class PreferenceLoss:
    """A DPO-family loss: ``kind`` ("dpo-sigmoid" | "ipo") and its β (``phi4_engine.titan.dpo``)."""

    kind: str
    beta: float = 0.1
