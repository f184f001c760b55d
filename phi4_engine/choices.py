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
    """How ranks split the work: FSDP shard degree (-1: all ranks) and tensor-parallel degree."""

    dp_shard: int = -1
    tp: int = 1


@dataclass(frozen=True)
class PreferenceLoss:
    """A DPO-family loss: ``kind`` ("dpo-sigmoid" | "ipo") and its β (``phi4_engine.titan.dpo``)."""

    kind: str
    beta: float = 0.1
