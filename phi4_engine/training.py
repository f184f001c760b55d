"""What the LM stages (pretrain, midtrain, sft) share: their spec fields and the run loop glue.

A stage module adds its recipe-specific fields and calls :func:`run_lm_stage`, which builds the
data mixture from plugins, hands a plain :class:`~phi4_engine.titan.trainer.LMJob` to the
torchtitan adapter, and turns hook callbacks into lifecycle notifications.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import orjson
from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from phi4_engine import ranks
from phi4_engine.data.source import SourceContext
from phi4_engine.rundir import atomic_write
from phi4_engine.spec.base import DataSourceRef, LossRef, SchedulerRef, SpecModel, resolve_path
from phi4_engine.stage import StageContext, StageSpec


def _file(value: str, info: ValidationInfo) -> str:
    return resolve_path(value, info)


class DecontaminationSection(SpecModel):
    """Drop training documents that overlap benchmark items ([P4] App. B.1, Alg. 1; the
    algorithm and its choices are described in :mod:`phi4_engine.data.decontam`)."""

    benchmarks: list[Annotated[str, AfterValidator(_file)]] = Field(min_length=1)
    """Benchmark files: ``.txt`` = one item per line; anything else = JSONL, one item per record
    in ``field`` (a string, or a list of strings or of ``{content}`` messages, joined)."""
    field: str = "text"
    """Record field holding a benchmark item in JSONL benchmark files."""
    allow_list: Annotated[str, AfterValidator(_file)] | None = None
    """Text file of common phrases, one per line (e.g. MCQ option strings, frequent Wikipedia
    13-grams), whose n-grams never count as contamination."""
    ngram: int = Field(13, ge=2)
    """Length of the exact-match n-grams (the paper's 13)."""
    ratio_ngram: int = Field(7, ge=2)
    """Length of the n-grams of the overlap ratio (the paper's 7)."""
    info_threshold: float = Field(0.5, ge=0, le=1)
    """A ratio above this is reported (partial) — the paper does not give the value; 0.5 is ours."""
    contaminated_threshold: float = Field(0.8, ge=0, le=1)
    """A ratio at or above this drops the document — the paper does not give the value; 0.8 is ours."""

    @model_validator(mode="after")
    def _ordered(self) -> "DecontaminationSection":
        if self.contaminated_threshold < self.info_threshold:
            raise ValueError("contaminated_threshold must be >= info_threshold")
        return self


class MixtureSection(SpecModel):
    """Data sources mixed by weight (weights are token fractions)."""

    sources: list[DataSourceRef] = Field(min_length=1)  # type: ignore[valid-type]
    decontamination: DecontaminationSection | None = None
    """Drop documents overlapping benchmark sets (13-gram hits, 7-gram ratio); report in
    ``<stage>/data/decontamination.json``."""


class LMTraining(SpecModel):
    """Next-token training: budget, batch, optimizer and schedule (an LM stage's fields, also a
    section of stages that train an LM phase, like refusal's SFT)."""

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
    """RoPE base for this stage (default: the starting weights' — the previous stage's — or, for the first stage, the model section's)."""
    scheduler: SchedulerRef = Field(default_factory=lambda: {"kind": "warmup-cosine"}, validate_default=True)  # type: ignore[assignment]
    loss: LossRef = Field(default_factory=lambda: {"kind": "cross-entropy"}, validate_default=True)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _budget(self) -> "LMTraining":
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


class LMStageSpec(StageSpec, LMTraining):
    """A stage that trains next-token prediction on a data mixture."""

    data: MixtureSection


_FROM_STAGE: Any = object()


def build_sources(
    ctx: StageContext, sources: list[Any], decontamination: "DecontaminationSection | None" = _FROM_STAGE
) -> list[tuple[Any, float]]:
    """``(source, weight)`` for each spec; sources write what they keep (quarantine…) to
    ``<stage>/data/``. With a decontamination section (by default the stage's own
    ``data.decontamination``) each source is wrapped in a :class:`DecontaminatedSource`, which
    scans it once here and writes ``<stage>/data/decontamination.json``."""
    work_dir = os.path.join(ctx.stage_dir, "data")
    source_ctx = SourceContext(base_dir=ctx.spec_dir, seed=ctx.spec.seed, work_dir=work_dir)
    built = [(ctx.registry.build("data_source", s, source_ctx), s.weight) for s in sources]
    if decontamination is _FROM_STAGE:
        decontamination = getattr(getattr(ctx.stage_spec, "data", None), "decontamination", None)
    if decontamination is None:
        return built
    from phi4_engine.data.decontam import DecontaminatedSource, DecontaminationIndex, write_report

    index = DecontaminationIndex.from_section(decontamination)
    decode = getattr(ctx.tokenizer, "decode", None)  # for pre-tokenized (shards) documents
    wrapped = [(DecontaminatedSource(src, index, decode), w) for src, w in built]
    write_report(os.path.join(work_dir, "decontamination.json"), index, [src.report() for src, _ in wrapped])
    return wrapped


def _history(stage_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


class StageProgress:
    """Turns a trainer's callbacks into lifecycle notifications and keeps the step losses, so
    every training stage (LM or DPO) reports the same way."""

    def __init__(self, ctx: StageContext, kind: str, total_steps: int) -> None:
        self.ctx, self.kind, self.total = ctx, kind, total_steps
        self.losses: dict[int, float] = {}

    def on_start(self, step: int) -> None:
        ctx = self.ctx
        ctx.notify(
            "phi4_stage_start", run_dir=ctx.run_dir, stage=ctx.stage_name, kind=self.kind,
            stage_dir=ctx.stage_dir, total_steps=self.total, start_step=step,
        )  # fmt: skip

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics)
        lr = next((v for k, v in metrics.items() if k.startswith("lr")), None)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("lr")}
        if lr is not None:
            metrics["lr"] = lr
        self.losses[step] = metrics["loss"]
        self.ctx.notify("phi4_step_end", stage=self.ctx.stage_name, stage_dir=self.ctx.stage_dir, step=step, metrics=metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        self.ctx.notify("phi4_checkpoint_saved", stage=self.ctx.stage_name, step=step, path=path)

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_start": self.on_start, "on_step": self.on_step, "on_checkpoint": self.on_checkpoint}

    def loss_summary(self) -> dict[str, float | None]:
        """First loss and the mean of the last five, over the whole stage (resumes included)."""
        history = {row["step"]: row["loss"] for row in _history(self.ctx.stage_dir) if "loss" in row}
        history.update(self.losses)
        steps_sorted = sorted(history)
        tail = [history[s] for s in steps_sorted[-5:]]
        return {
            "loss_first": history[steps_sorted[0]] if steps_sorted else None,
            "loss_last": sum(tail) / len(tail) if tail else None,
        }


def inherited_rope_theta(ctx: StageContext) -> float:
    """A stage that does not set its RoPE base keeps its starting weights' (sft after a 250K
    midtrain trains at 250K); the first stage uses the model section's."""
    return ctx.init_weights.rope_theta if ctx.init_weights is not None else ctx.spec.model.rope_theta


def write_model_config(ctx: StageContext, *, flavor: str, rope_theta: float, seq_len: int) -> dict[str, Any]:
    """``<stage>/model.json``: the model the stage's weights belong to."""
    model_config = {
        "flavor": flavor,
        "vocab_size": ctx.tokenizer.vocab_size,
        "rope_theta": rope_theta,
        "seq_len": seq_len,
        "tokenizer": ctx.tokenizer.name,
        "tokenizer_fingerprint": ctx.tokenizer.fingerprint,
    }
    os.makedirs(ctx.stage_dir, exist_ok=True)
    if ranks.is_main():
        atomic_write(Path(ctx.stage_dir) / "model.json", orjson.dumps(model_config, option=orjson.OPT_INDENT_2))
    return model_config


def run_lm_stage(
    ctx: StageContext,
    spec: LMTraining,
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
    progress = StageProgress(ctx, getattr(spec, "kind", ctx.stage_name), total)
    batch_local = spec.micro_batch_size or spec.batch_size
    job = LMJob(
        dump_folder=ctx.stage_dir,
        flavor=run_spec.model.flavor,
        vocab_size=ctx.tokenizer.vocab_size,
        rope_theta=rope_theta or spec.rope_theta or inherited_rope_theta(ctx),
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
        layout=layout,
        make_loader=make_loader,
        tokenizer=ctx.tokenizer,
        seed=run_spec.seed,
        checkpoint_interval=run_spec.checkpoint.interval,
        keep_latest_k=run_spec.checkpoint.keep_latest_k,
        on_corrupt=run_spec.checkpoint.on_corrupt,
        init_weights_from=ctx.init_checkpoint,
        **progress.callbacks(),
    )
    model_config = write_model_config(ctx, flavor=job.flavor, rope_theta=job.rope_theta, seq_len=spec.seq_len)
    result = run_lm(job)
    return {
        "steps": result.step,
        "tokens": result.tokens,
        "final_checkpoint": result.final_checkpoint,
        "weights_sha256": result.weights_sha256,
        "init_weights_sha256": result.init_weights_sha256,
        "model": model_config,
        "metrics": progress.loss_summary(),
    }


class LMStage:
    """A stage that trains next-token prediction on a mixture (pretrain, midtrain, sft).

    Subclasses choose the mixture (:meth:`mixture_sources`) and whether records are chats
    (``chat = True``: ChatML rendering, loss on assistant tokens only).
    """

    chat = False
    distributed = True  # runs under torchrun: every rank trains its share of each batch

    def __init__(self, spec: LMStageSpec, ctx: StageContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.loaders: list[Any] = []

    def mixture_sources(self) -> list[tuple[Any, float]]:
        return build_sources(self.ctx, self.spec.data.sources)

    def make_loader(self, dp_rank: int, dp_world_size: int, seq_len: int, batch_size: int) -> Any:
        from phi4_engine.data.mixture import MixtureLoader

        loader = MixtureLoader(
            self.mixture_sources(),
            self.ctx.tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            chat=self.chat,
        )
        self.loaders.append(loader)
        return loader

    def run(self) -> dict[str, Any]:
        summary = run_lm_stage(self.ctx, self.spec, self.make_loader)
        if self.loaders:
            loader = self.loaders[-1]
            summary["data"] = loader.stats()
            summary["data_reports"] = loader.reports()
            if ranks.is_main():
                print(f"\n{self.ctx.stage_name}: data drawn per source\n{loader.table()}\n", file=sys.stderr)
        return summary
