"""What the LM stages (pretrain, midtrain, sft) share: their spec fields and the run loop glue.

A stage module adds its recipe-specific fields and calls :func:`run_lm_stage`, which builds the
data mixture from plugins, hands a plain :class:`~phi4_engine.titan.trainer.LMJob` to the
torchtitan adapter, and turns hook callbacks into lifecycle notifications.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import orjson
from pydantic import Field, model_validator

from phi4_engine.data.source import SourceContext
from phi4_engine.spec.base import DataSourceRef, LossRef, SchedulerRef, SpecModel
from phi4_engine.stage import StageContext, StageSpec


class MixtureSection(SpecModel):
    """Data sources mixed by weight (weights are token fractions)."""

    sources: list[DataSourceRef] = Field(min_length=1)  # type: ignore[valid-type]


class LMStageSpec(StageSpec):
    """Next-token training: budget, batch, optimizer and schedule."""

    steps: int | None = Field(None, ge=1)
    """Optimizer steps. Give either ``steps`` or ``tokens``."""
    tokens: float | None = Field(None, gt=0)
    """Token budget; steps = ceil(tokens / (batch_size * seq_len))."""
    seq_len: int = Field(ge=8)
    """Tokens per packed sequence."""
    batch_size: int = Field(ge=1)
    """Global batch: sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per rank per forward pass (gradient accumulation covers the rest)."""
    lr: float = Field(gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (not given in the paper)."""
    max_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm (not given in the paper)."""
    rope_theta: float | None = Field(None, gt=0)
    """RoPE base for this stage (default: the model section's)."""
    scheduler: SchedulerRef = Field(default_factory=lambda: {"kind": "warmup-cosine"}, validate_default=True)  # type: ignore[assignment]
    loss: LossRef = Field(default_factory=lambda: {"kind": "cross-entropy"}, validate_default=True)  # type: ignore[assignment]
    data: MixtureSection

    @model_validator(mode="after")
    def _budget(self) -> "LMStageSpec":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'steps' or 'tokens'")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        return self

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))  # type: ignore[operator]


def build_sources(ctx: StageContext, sources: list[Any]) -> list[tuple[Any, float]]:
    source_ctx = SourceContext(base_dir=ctx.spec_dir, seed=ctx.spec.seed)
    return [(ctx.registry.build("data_source", s, source_ctx), s.weight) for s in sources]


def _history(stage_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def run_lm_stage(
    ctx: StageContext,
    spec: LMStageSpec,
    make_loader: Callable[[int, int, int, int], Any],
    *,
    rope_theta: float | None = None,
) -> dict[str, Any]:
    """Train ``spec.total_steps`` steps (resuming if the stage folder has a checkpoint)."""
    from phi4_engine.titan.trainer import LMJob, run_lm

    run_spec = ctx.spec
    schedule = ctx.registry.build("scheduler", spec.scheduler)
    layout = ctx.registry.build("parallelism", run_spec.parallelism)
    ctx.registry.build("loss", spec.loss)
    total = spec.total_steps
    losses: dict[int, float] = {}

    def on_start(step: int) -> None:
        ctx.notify(
            "phi4_stage_start", run_dir=ctx.run_dir, stage=ctx.stage_name, kind=spec.kind,  # type: ignore[attr-defined]
            stage_dir=ctx.stage_dir, total_steps=total, start_step=step,
        )

    def on_step(step: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics)
        lr = next((v for k, v in metrics.items() if k.startswith("lr")), None)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("lr")}
        if lr is not None:
            metrics["lr"] = lr
        losses[step] = metrics["loss"]
        ctx.notify("phi4_step_end", stage=ctx.stage_name, stage_dir=ctx.stage_dir, step=step, metrics=metrics)

    def on_checkpoint(step: int, path: str) -> None:
        ctx.notify("phi4_checkpoint_saved", stage=ctx.stage_name, step=step, path=path)

    batch_local = spec.micro_batch_size or spec.batch_size
    job = LMJob(
        dump_folder=ctx.stage_dir,
        flavor=run_spec.model.flavor,
        vocab_size=ctx.tokenizer.vocab_size,
        rope_theta=rope_theta or spec.rope_theta or run_spec.model.rope_theta,
        seq_len=spec.seq_len,
        steps=total,
        batch_size=batch_local,
        global_batch_size=spec.batch_size,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        betas=tuple(spec.betas),
        max_norm=spec.max_norm,
        warmup_steps=schedule.warmup_steps,
        decay_type=schedule.decay_type,
        min_lr_factor=schedule.min_lr_factor,
        dp_shard=layout.dp_shard,
        tp=layout.tp,
        make_loader=make_loader,
        tokenizer=ctx.tokenizer,
        seed=run_spec.seed,
        checkpoint_interval=run_spec.checkpoint.interval,
        keep_latest_k=run_spec.checkpoint.keep_latest_k,
        init_weights_from=ctx.init_checkpoint,
        on_start=on_start,
        on_step=on_step,
        on_checkpoint=on_checkpoint,
    )
    result = run_lm(job)
    history = {row["step"]: row["loss"] for row in _history(ctx.stage_dir) if "loss" in row}
    history.update(losses)
    steps_sorted = sorted(history)
    tail = [history[s] for s in steps_sorted[-5:]]
    return {
        "steps": result.step,
        "tokens": result.tokens,
        "final_checkpoint": result.final_checkpoint,
        "weights_sha256": result.weights_sha256,
        "metrics": {
            "loss_first": history[steps_sorted[0]] if steps_sorted else None,
            "loss_last": sum(tail) / len(tail) if tail else None,
        },
    }
