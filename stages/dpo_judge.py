"""dpo-judge: DPO round 2 — whole-response pairs ranked by a judge ([P4] §4.2, App. A.2).

For each prompt: ``candidates`` responses sampled from the policy (the previous stage's final
weights) plus the record's own reference answer → a judge scores each on accuracy, style and
detail (1–5) → the best and the worst form a pair when :func:`phi4_engine.judging.prefer` ranks
them (higher accuracy, else higher mean; a tie makes no pair). Prompts are taken in batches
until ``pairs`` pairs exist; then DPO trains on them (:mod:`phi4_engine.preference`).

Resumable at every point, under ``<stage>/data/``: ``candidates.jsonl`` holds each generated
batch (exact token ids), ``verdicts.jsonl`` each judgment (keyed by judge, version, prompt and
response — a resume never asks again), ``judge-quarantine.jsonl`` every failed or malformed
judgment with its raw text (never a default score), ``pairs.jsonl`` the final pairs.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import nullcontext
from typing import Any, Literal

from pydantic import Field

from phi4_engine import ranks
from phi4_engine.errors import EngineError
from phi4_engine.judging import JudgeItem, Verdict, VerdictCache, prefer
from phi4_engine.preference import (
    DpoStageSpec,
    Prompt,
    build_then_train,
    data_dir,
    load_policy,
    prompt_batches,
    stable_seed,
)
from phi4_engine.progress import WorkProgress
from phi4_engine.rundir import AppendLog
from phi4_engine.spec.base import JudgeRef
from phi4_engine.stage import StageContext


class DpoJudgeSpec(DpoStageSpec):
    """DPO round 2: whole-response pairs ranked by a judge (accuracy, style, detail)."""

    kind: Literal["dpo-judge"]
    candidates: int = Field(4, ge=1)
    """Responses sampled from the policy per prompt."""
    include_references: bool = True
    """The record's own assistant answer (if any) joins the candidates."""
    judge: JudgeRef = Field(default_factory=lambda: {"kind": "rule"}, validate_default=True)  # type: ignore[assignment]
    """Who scores the candidates: ``rule`` (embedded tasks) or ``openai-chat`` (an LLM endpoint)."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    prompts_per_batch: int = Field(16, ge=1)
    """Prompts generated for (and judged) together."""


class DpoJudgeStage:
    distributed = True  # under --nproc: generation dealt over the ranks, DPO on all of them

    def __init__(self, spec: DpoJudgeSpec, ctx: StageContext) -> None:
        self.spec, self.ctx = spec, ctx

    def run(self) -> dict[str, Any]:
        return build_then_train(self.ctx, self.spec, self.build_pairs, "pair_building")

    # -- building pairs ----------------------------------------------------------------------

    def build_pairs(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        spec, ctx, tok = self.spec, self.ctx, self.ctx.tokenizer
        judge = ctx.registry.build("judge", spec.judge)
        model = load_policy(ctx, spec.seq_len)
        from phi4_engine.titan.generate import Generator

        generator = Generator(model, eos_ids={tok.im_end_id, tok.eos_id}, pad_id=tok.pad_id)
        folder = data_dir(ctx)
        main = ranks.is_main()
        # Under --nproc every rank generates: a round of ``world`` batches, one per rank (each
        # batch has its own seed, so its candidates are the same under any world size); rank 0
        # alone writes the logs and asks the judge, and says when there are enough pairs.
        log = AppendLog(folder / "candidates.jsonl", write=main)
        done = ranks.from_main({rec["batch"]: rec["responses"] for rec in log.records})
        counts = {"prompts": 0, "too_long": 0, "ties": 0, "no_verdicts": 0, "from_reference": 0}
        records: list[dict[str, Any]] = []
        batches = enumerate(prompt_batches(ctx, spec, spec.prompts_per_batch, counts))
        with log, VerdictCache(folder) if main else nullcontext() as cache, \
                WorkProgress(f"{ctx.stage_name}: pairs", total=spec.pairs, unit="pairs") as bar:
            enough = False
            while not enough and (round_ := list(itertools.islice(batches, ranks.world_size()))):
                todo = [(index, batch) for index, batch in round_ if index not in done]
                made = ranks.split_work(todo, lambda share: [self._generate(generator, b, i) for i, b in share])
                for (index, batch), responses in zip(todo, made):
                    done[index] = responses
                    log.append({"batch": index, "ids": [p.id for p in batch], "responses": responses})
                for index, batch in round_:
                    if enough:
                        break
                    new = self._pairs_for_batch(judge, cache, batch, done[index], counts) if main else []
                    records.extend(new[: spec.pairs - len(records)])
                    counts["prompts"] += len(batch)
                    bar.advance(len(new), info=f"{counts['prompts']} prompts")
                    enough = len(records) >= spec.pairs
                enough = ranks.from_main(enough)
            stats = cache.stats() if main else {"asked": 0, "ok": 0}
        if stats["asked"] and stats["ok"] == 0:
            raise EngineError(f"stage {ctx.stage_name!r}: every judgment failed ({stats}); see "
                              f"{folder / 'judge-quarantine.jsonl'} for the judge's raw replies")
        report = {**counts, "pairs": len(records), "judge": {"name": judge.name, "version": judge.version, **stats}}
        if len(records) < spec.pairs and main:
            print(f"{ctx.stage_name}: prompts ran out after {len(records)} of {spec.pairs} pairs", file=sys.stderr)
        return records, report

    def _generate(self, generator: Any, batch: list[Prompt], index: int) -> list[list[list[int]]]:
        """``candidates`` responses per prompt as exact token ids (``<|im_end|>`` kept when the
        policy stopped, so DPO teaches it to stop too)."""
        spec, tok = self.spec, self.ctx.tokenizer
        rows = [tok.encode_chat(p.messages, add_generation_prompt=True)[0] for p in batch for _ in range(spec.candidates)]
        outs = generator.generate_completions(
            rows, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            seed=stable_seed(self.ctx.spec.seed, self.ctx.stage_name, index), eos_ids={tok.im_end_id, tok.eos_id},
        )  # fmt: skip
        ids = [o.tokens + ([tok.im_end_id] if o.finish_reason == "stop" else []) for o in outs]
        return [ids[i * spec.candidates : (i + 1) * spec.candidates] for i in range(len(batch))]

    def _pairs_for_batch(self, judge: Any, cache: VerdictCache, batch: list[Prompt], responses: list[list[list[int]]],
                         counts: dict[str, int]) -> list[dict[str, Any]]:
        tok = self.ctx.tokenizer
        options: list[list[tuple[list[int], str, str]]] = []  # per prompt: (ids, text, source)
        for prompt, ids_list in zip(batch, responses):
            opts = [(ids, tok.decode([t for t in ids if t != tok.im_end_id]), "policy") for ids in ids_list]
            if self.spec.include_references and prompt.reference is not None:
                opts.append((tok.encode(prompt.reference) + [tok.im_end_id], prompt.reference, "reference"))
            options.append(opts)
        items = [JudgeItem(p.messages, text, p.meta) for p, opts in zip(batch, options) for _, text, _ in opts]
        results = iter(cache.score(judge, items))
        out = []
        for prompt, opts in zip(batch, options):
            verdicts = [next(results) for _ in opts]
            judged = [(opt, v) for opt, v in zip(opts, verdicts) if isinstance(v, Verdict)]
            if len(judged) < 2:
                counts["no_verdicts"] += 1
                continue
            # best = highest (accuracy, mean); worst = lowest; first seen wins ties (deterministic)
            best = max(judged, key=lambda x: (x[1].scores["accuracy"], x[1].mean))
            worst = min(judged, key=lambda x: (x[1].scores["accuracy"], x[1].mean))
            if prefer(best[1], worst[1]) <= 0:
                counts["ties"] += 1
                continue
            counts["from_reference"] += best[0][2] == "reference"
            out.append({
                "id": prompt.id,
                "prompt_ids": tok.encode_chat(prompt.messages, add_generation_prompt=True)[0],
                "chosen_ids": best[0][0], "rejected_ids": worst[0][0],
                "chosen_text": best[0][1], "rejected_text": worst[0][1],
                "chosen_scores": best[1].scores, "rejected_scores": worst[1].scores,
                "chosen_source": best[0][2], "rejected_source": worst[0][2],
            })  # fmt: skip
        return out

