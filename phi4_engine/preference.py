"""What the DPO stages (dpo-pivotal, dpo-judge, refusal's DPO phase) share.

A DPO stage has two phases. First it BUILDS preference pairs (PTS, judged candidates, …) and
writes them once, atomically, to ``<stage>/data/pairs.jsonl`` — token ids plus readable text, so
the data can be inspected and a resumed run never rebuilds it. Then it TRAINS on them through
:mod:`phi4_engine.titan.dpo` from the previous stage's final weights.

Everything a DPO stage writes under ``<stage>/data/``:

* ``pairs.jsonl`` — one pair per line (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
  ``score_first`` and whatever readable fields the stage adds); its sha256 keys the next file;
* ``ref-logps-<key>.json`` — the reference model's summed log-probs of each pair, computed once
  with the frozen starting weights; ``key`` hashes the pairs file, the starting weights'
  sha256 and the sequence length, so a changed input never reuses a stale cache;
* the stage's own caches (judge verdicts, rollout estimates), each resumable.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import orjson
from pydantic import Field, model_validator

from phi4_engine import ranks
from phi4_engine.errors import EngineError
from phi4_engine.rundir import atomic_write
from phi4_engine.spec.base import DataSourceRef, LossRef, SchedulerRef, SpecModel
from phi4_engine.stage import StageContext, StageSpec
from phi4_engine.training import StageProgress, build_sources, write_model_config


class DpoTraining(SpecModel):
    """DPO on built pairs: the pair budget, the loss, the reference, and the optimizer (a DPO
    stage's fields, also a section of stages with a DPO phase, like refusal's)."""

    pairs: int = Field(ge=1)
    """Preference pairs to build (fewer if the prompts run out; the stage reports how many)."""
    loss: LossRef = Field(default_factory=lambda: {"kind": "dpo-sigmoid"}, validate_default=True)  # type: ignore[assignment]
    """``dpo-sigmoid`` or ``ipo``, with its β (the paper does not give β)."""
    reference: Literal["cached", "live"] = "cached"
    """``cached``: reference log-probs computed once with the frozen starting model and stored
    under ``<stage>/data/``; ``live``: a frozen copy of the starting model runs every step."""
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    """Pairs per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Pairs per rank per forward pass (gradient accumulation covers the rest)."""
    seq_len: int = Field(ge=8)
    """Longest prompt + response row; longer responses are cut."""
    epochs: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_norm: float = Field(1.0, gt=0)
    scheduler: SchedulerRef = Field(  # type: ignore[assignment]
        default_factory=lambda: {"kind": "warmup-linear", "warmup_steps": 0, "min_lr_factor": 0.0}, validate_default=True
    )

    @model_validator(mode="after")
    def _batches(self) -> "DpoTraining":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        return self

    def steps_for(self, pairs: int) -> int:
        return max(1, math.ceil(pairs * self.epochs / self.batch_size))


class DpoStageSpec(StageSpec, DpoTraining):
    """A DPO stage: pairs built from prompts by the policy, then DPO on them."""

    prompts: list[DataSourceRef] = Field(min_length=1)  # type: ignore[valid-type]
    """Where questions come from: chat records (the last assistant turn, if any, is the
    record's reference answer) drawn from the sources in proportion to their weights."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest response the policy generates while building pairs."""

    @model_validator(mode="after")
    def _room(self) -> "DpoStageSpec":
        if self.max_new_tokens >= self.seq_len:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below seq_len ({self.seq_len})")
        return self


# -- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A question to build pairs for: the conversation up to the answer, and what the record
    says about it (``reference``: its own answer; ``meta``: task data for judges/verifiers)."""

    id: str
    messages: list[dict[str, str]]
    reference: str | None
    meta: dict[str, Any] | None


def iter_prompts(ctx: StageContext, sources: Sequence[Any]) -> Iterator[Prompt]:
    """Prompts from the sources, interleaved by weight (smooth weighted round-robin, so the
    order is deterministic and each source's share of any prefix matches its weight)."""
    built = build_sources(ctx, list(sources), decontamination=None)
    streams = [(src.name, src.documents(), w) for src, w in built]
    credit = [0.0] * len(streams)
    total = sum(w for *_, w in streams)
    live = list(range(len(streams)))
    while live:
        for i in live:
            credit[i] += streams[i][2]
        pick = max(live, key=lambda i: credit[i])
        credit[pick] -= total
        name, docs, _ = streams[pick]
        doc = next(docs, None)
        if doc is None:
            live.remove(pick)
            continue
        if not doc.messages:
            raise EngineError(f"stage {ctx.stage_name!r}: prompts source {name!r} gave {doc.id}, which is not a chat "
                              f"record; prompts need chat records (e.g. format: chat)")
        messages = [dict(m) for m in doc.messages]
        reference = None
        if messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        if not messages:
            raise EngineError(f"stage {ctx.stage_name!r}: prompts source {name!r}: {doc.id} has no question before its answer")
        yield Prompt(f"{name}:{doc.id}", messages, reference, doc.meta)


def prompt_batches(ctx: StageContext, spec: "DpoStageSpec", size: int, counts: dict[str, int]) -> Iterator[list[Prompt]]:
    """Batches of ``size`` prompts whose rendered chat leaves room for ``max_new_tokens``
    within ``seq_len``; the others are counted in ``counts["too_long"]``."""
    prompts = iter_prompts(ctx, spec.prompts)
    counts.setdefault("too_long", 0)
    while True:
        batch: list[Prompt] = []
        for prompt in prompts:
            if len(ctx.tokenizer.encode_chat(prompt.messages, add_generation_prompt=True)[0]) + spec.max_new_tokens > spec.seq_len:
                counts["too_long"] += 1
                continue
            batch.append(prompt)
            if len(batch) == size:
                break
        if not batch:
            return
        yield batch


# -- the pairs file --------------------------------------------------------------------------


def data_dir(ctx: StageContext) -> Path:
    path = Path(ctx.stage_dir) / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_pairs(ctx: StageContext, records: Sequence[dict[str, Any]], report: dict[str, Any]) -> None:
    """``pairs-report.json`` (how the pairs were built), then ``pairs.jsonl``, each atomically:
    the pairs file's existence is what marks the building phase done."""
    folder = data_dir(ctx)
    atomic_write(folder / "pairs-report.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
    atomic_write(folder / "pairs.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in records))


def load_pairs(ctx: StageContext) -> tuple[list[dict[str, Any]], str, dict[str, Any]] | None:
    """``(records, sha256 of pairs.jsonl, report)``, or None before the pairs are built."""
    folder = data_dir(ctx)
    path = folder / "pairs.jsonl"
    if not path.exists():
        return None
    data = path.read_bytes()
    records = []
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            rec = orjson.loads(line)
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                if not isinstance(rec[key], list) or not rec[key]:
                    raise ValueError(f"{key} must be a non-empty list of token ids")
        except (orjson.JSONDecodeError, KeyError, ValueError) as exc:
            raise EngineError(f"{path}:{lineno}: not a preference pair ({exc})") from None
        records.append(rec)
    report_path = folder / "pairs-report.json"
    report = orjson.loads(report_path.read_bytes()) if report_path.exists() else {}
    return records, hashlib.sha256(data).hexdigest(), report


def build_then_train(ctx: StageContext, spec: DpoTraining, build: Any, report_key: str) -> dict[str, Any]:
    """The DPO stage's two phases: ``build() -> (records, report)`` once (skipped when
    ``pairs.jsonl`` exists), then DPO on the pairs; the report joins the summary.

    Under --nproc every rank builds (generation is split over the ranks) and trains; rank 0
    writes the pairs, and its view of whether they exist is everyone's."""
    if ranks.from_main(load_pairs(ctx) is None):
        built = build()
        if ranks.is_main():
            save_pairs(ctx, *built)
        ranks.barrier()
    records, sha, report = load_pairs(ctx)  # type: ignore[misc]
    summary = train_on_pairs(ctx, spec, records, sha)
    summary[report_key] = report
    return summary


def preference_pairs(records: Sequence[dict[str, Any]]) -> list[Any]:
    from phi4_engine.titan.dpo import PreferencePair

    return [PreferencePair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r.get("score_first")) for r in records]


# -- reference log-probs and training ---------------------------------------------------------


def _starting_weights(ctx: StageContext) -> Any:
    if ctx.init_weights is None or not ctx.init_checkpoint:
        raise EngineError(f"stage {ctx.stage_name!r} trains from the previous stage's weights; "
                          f"put a training stage (e.g. sft) before it in the spec")
    return ctx.init_weights


def reference_logps(ctx: StageContext, spec: DpoTraining, pairs: Sequence[Any], pairs_sha256: str) -> list[tuple[float, float]]:
    """The frozen starting model's summed log-probs per pair, cached under ``<stage>/data/``."""
    from phi4_engine.titan.dpo import compute_reference_logps

    weights = _starting_weights(ctx)
    key_src = f"{pairs_sha256}:{ctx.init_weights_sha256 or weights.checkpoint}:{spec.seq_len}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = data_dir(ctx) / f"ref-logps-{key}.json"
    cached = orjson.loads(path.read_bytes()) if ranks.from_main(path.exists()) else None
    if cached is not None and len(cached["logps"]) == len(pairs):
        return [tuple(x) for x in cached["logps"]]  # type: ignore[misc]
    logps = compute_reference_logps(  # batches dealt over the ranks under --nproc
        weights.checkpoint, pairs, flavor=weights.flavor, vocab_size=ctx.tokenizer.vocab_size,
        rope_theta=weights.rope_theta, seq_len=spec.seq_len, pad_id=ctx.tokenizer.pad_id,
    )  # fmt: skip
    if ranks.is_main():
        record = {"pairs_sha256": pairs_sha256, "init_weights_sha256": ctx.init_weights_sha256, "logps": logps}
        atomic_write(path, orjson.dumps(record))
    return logps


def train_on_pairs(ctx: StageContext, spec: DpoTraining, records: Sequence[dict[str, Any]], pairs_sha256: str) -> dict[str, Any]:
    """DPO on ``records`` from the previous stage's weights; returns the stage summary."""
    from phi4_engine.titan.dpo import DPOJob, pairs_loader, run_dpo

    if not records:
        raise EngineError(f"stage {ctx.stage_name!r} built no preference pairs; see <stage>/data/ for why")
    weights = _starting_weights(ctx)
    pairs = preference_pairs(records)
    ref = reference_logps(ctx, spec, pairs, pairs_sha256) if spec.reference == "cached" else None
    loss = ctx.registry.build("loss", spec.loss)
    if loss == "cross-entropy":
        raise EngineError(f"stage {ctx.stage_name!r}: loss must be a preference loss (dpo-sigmoid, ipo), not cross-entropy")
    schedule = ctx.registry.build("scheduler", spec.scheduler)
    layout = ctx.registry.build("parallelism", ctx.spec.parallelism)
    steps = spec.steps_for(len(pairs))
    progress = StageProgress(ctx, getattr(spec, "kind", ctx.stage_name), steps)
    job = DPOJob(
        dump_folder=ctx.stage_dir, flavor=weights.flavor, vocab_size=ctx.tokenizer.vocab_size,
        rope_theta=weights.rope_theta, seq_len=spec.seq_len, steps=steps,
        batch_size=spec.micro_batch_size or spec.batch_size, global_batch_size=spec.batch_size,
        lr=spec.lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas), max_norm=spec.max_norm,
        warmup_steps=schedule.warmup_steps, decay_type=schedule.decay_type, min_lr_factor=schedule.min_lr_factor,
        layout=layout, seed=ctx.spec.seed,
        make_loader=pairs_loader(pairs, pad_id=ctx.tokenizer.pad_id, ref_logps=ref, seed=ctx.spec.seed),
        loss=loss.kind, beta=loss.beta, reference=spec.reference, init_weights_from=ctx.init_checkpoint,
        checkpoint_interval=ctx.spec.checkpoint.interval, keep_latest_k=ctx.spec.checkpoint.keep_latest_k,
        on_corrupt=ctx.spec.checkpoint.on_corrupt,
        **progress.callbacks(),
    )  # fmt: skip
    model_config = write_model_config(ctx, flavor=weights.flavor, rope_theta=weights.rope_theta, seq_len=spec.seq_len)
    result = run_dpo(job)
    tokens_per_epoch = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)
    return {
        "steps": result.step,
        "tokens": tokens_per_epoch * result.pairs // max(len(records), 1),
        "pairs": len(records),
        "pairs_trained": result.pairs,
        "pairs_sha256": pairs_sha256,
        "final_checkpoint": result.final_checkpoint,
        "weights_sha256": result.weights_sha256,
        "init_weights_sha256": result.init_weights_sha256,
        "model": model_config,
        "metrics": progress.loss_summary(),
    }


def load_policy(ctx: StageContext, max_seq_len: int) -> Any:
    """The starting weights as a model for generation (eval mode)."""
    from phi4_engine.evaluation import load_weights

    return load_weights(_starting_weights(ctx), ctx.tokenizer.vocab_size, max_seq_len)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
