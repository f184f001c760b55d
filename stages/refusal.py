"""refusal: hallucination mitigation ([P4] §4.4, App. A.1; FACTS.md §3, Refusal).

Three phases, each resumable, in ``<stage>/``:

1. **data** (``data/``): ``num_questions`` records from ``questions`` — answerable ones and
   bogus ones (``meta.bogus``; e.g. ``synthetic-refusal``). For each answerable question the
   starting model answers ``samples`` times and a verifier estimates P(correct). Then, as the
   paper does:
   * SFT records: (q, its answer) if P(correct) >= ``answer_above``, else (q, ``refusal``);
     (bogus q, its refusal) always;
   * DPO pairs over the first ``dpo.first_tokens`` response tokens: correct ≻ refusal when the
     model is sometimes right; refusal ≻ its wrong answer when sometimes wrong; on a bogus
     question, refusal ≻ the model's attempted answer.
2. **sft** (``sft/``): next-token training on the SFT records (loss on the answers only),
   mixed with the ``recall_from`` stage's data (refusal records are ``refusal_share`` of the
   tokens, as refusal data is a small share of the paper's post-training mixture).
3. **dpo** (``dpo/``): DPO on the pairs from the SFT phase's weights (the reference is the
   SFT'd model, as in the paper's DPO after SFT).

The stage's final weights are the DPO phase's; its evaluations (before/after) compare the
starting model with them — ``refusal-rates`` gives SimpleQA's correct / incorrect /
not-attempted split on held-out bogus and answerable questions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import orjson
from pydantic import Field

from phi4_engine import ranks
from phi4_engine.data.source import Document
from phi4_engine.errors import EngineError
from phi4_engine.evaluation import WeightsRef
from phi4_engine.preference import DpoTraining, data_dir, iter_prompts, load_pairs, load_policy, save_pairs, stable_seed, train_on_pairs
from phi4_engine.progress import WorkProgress
from phi4_engine.rundir import atomic_write
from phi4_engine.spec.base import DataSourceRef, VerifierRef
from phi4_engine.stage import StageContext, StageSpec
from phi4_engine.training import LMTraining, build_sources, run_lm_stage


class RefusalSft(LMTraining):
    """The refusal SFT phase's budget and optimizer."""


class RefusalDpo(DpoTraining):
    """The refusal DPO phase; pairs compare only the first ``first_tokens`` response tokens."""

    first_tokens: int = Field(5, ge=1)
    """DPO pairs compare only the first N response tokens, as the paper does."""


class RefusalSpec(StageSpec):
    """Hallucination mitigation: refusal SFT then DPO over the first response tokens."""

    kind: Literal["refusal"]
    questions: list[DataSourceRef] = Field(min_length=1)  # type: ignore[valid-type]
    """Chat records with ``meta.bogus`` (and ``meta.answer`` when answerable)."""
    num_questions: int = Field(400, ge=1)
    """Records read to build the SFT records and the DPO pairs."""
    samples: int = Field(4, ge=1)
    """Answers sampled per answerable question to estimate P(correct)."""
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, ge=1)
    answer_above: float = Field(0.5, ge=0, le=1)
    """SFT keeps the answer of an answerable question when P(correct) >= this ("usually
    right"); else it teaches a refusal. The paper gives no number."""
    refuse_below: float = Field(1.0, ge=0, le=1)
    """DPO prefers a refusal to a wrong answer when P(correct) < this (1.0: whenever the model
    is sometimes wrong, the paper's wording); a correct answer is preferred to a refusal
    whenever it is sometimes right (P > 0)."""
    refusal: str = "I cannot answer this reliably."
    """What the model is taught to say to answerable questions it usually gets wrong."""
    refusal_prefix: str = "I cannot answer"
    """An answer starting with this is a refusal (never sampled as a 'wrong answer')."""
    verifier: VerifierRef = Field(default_factory=lambda: {"kind": "math-answer"}, validate_default=True)  # type: ignore[assignment]
    recall_from: str | None = "sft"
    """Stage whose data sources are mixed into the refusal SFT phase ([P4]: refusal data is a
    small share of the post-training mixture, not a data set of its own); null: refusal
    records only."""
    refusal_share: float = Field(0.3, gt=0, le=1)
    """Token share of the refusal records in the SFT phase when ``recall_from`` is set."""
    sft: RefusalSft
    dpo: RefusalDpo


class RecordsSource:
    """The SFT records as a data source (in memory, in order)."""

    def __init__(self, name: str, docs: list[Document]) -> None:
        self.name, self.docs = name, docs

    def __len__(self) -> int:
        return len(self.docs)

    def documents(self, start: int = 0):
        yield from self.docs[start:]


def _phase_ctx(ctx: StageContext, phase: str, start: dict[str, Any] | None = None) -> StageContext:
    """The stage's context for one training phase: its own folder ``<stage>/<phase>``, and (for
    a later phase) the previous phase's final weights as its start."""
    changes: dict[str, Any] = {"stage_name": f"{ctx.stage_name}/{phase}"}
    if start is not None:
        assert ctx.init_weights is not None
        changes.update(
            init_checkpoint=start["final_checkpoint"],
            init_weights=WeightsRef(start["final_checkpoint"], ctx.init_weights.flavor, start["model"]["rope_theta"]),
            init_weights_sha256=start["weights_sha256"],
        )
    return dataclasses.replace(ctx, **changes)


class RefusalStage:
    distributed = True  # under --nproc: generation dealt over the ranks, DPO on all of them

    def __init__(self, spec: RefusalSpec, ctx: StageContext) -> None:
        self.spec, self.ctx = spec, ctx

    def run(self) -> dict[str, Any]:
        ctx, spec = self.ctx, self.spec
        folder = data_dir(ctx)
        # Under --nproc every rank samples and trains; rank 0 writes, and its view of what is
        # already done is everyone's (ranks.from_main).
        if ranks.from_main(load_pairs(ctx) is None):
            sft_records, pairs, report = self.build_data()
            if ranks.is_main():
                atomic_write(folder / "sft-records.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in sft_records))
                save_pairs(ctx, pairs, report)
            ranks.barrier()
        records, sha, report = load_pairs(ctx)  # type: ignore[misc]

        done_path = folder / "sft-phase.json"
        if ranks.from_main(done_path.exists()):
            sft = orjson.loads(done_path.read_bytes())
        else:
            docs = [Document(id=r["id"], messages=tuple(r["messages"])) for r in
                    (orjson.loads(line) for line in (folder / "sft-records.jsonl").read_bytes().splitlines())]
            sft = self.train_sft(docs)
            if ranks.is_main():
                atomic_write(done_path, orjson.dumps(sft))
        dpo = train_on_pairs(_phase_ctx(ctx, "dpo", start=sft), spec.dpo, records, sha)
        return {
            **dpo,
            "steps": sft["steps"] + dpo["steps"],
            "tokens": sft["tokens"] + dpo["tokens"],
            "init_weights_sha256": ctx.init_weights_sha256,
            "phases": [{"phase": "sft", **{k: sft[k] for k in ("steps", "tokens", "weights_sha256", "metrics")}},
                       {"phase": "dpo", **{k: dpo[k] for k in ("steps", "pairs", "weights_sha256", "metrics")}}],
            "data_building": report,
        }

    def train_sft(self, docs: list[Document]) -> dict[str, Any]:
        from phi4_engine.data.mixture import MixtureLoader

        ctx = _phase_ctx(self.ctx, "sft")
        sources: list[tuple[Any, float]] = [(RecordsSource("refusal-sft", docs), 1.0)]
        if self.spec.recall_from is not None:
            recall = next((s for s in ctx.spec.stages if s.name == self.spec.recall_from and hasattr(s, "data")), None)
            if recall is None:
                raise EngineError(f"stage {self.ctx.stage_name!r}: recall_from {self.spec.recall_from!r} names no stage with data sources")
            mixed = build_sources(ctx, recall.data.sources, decontamination=None)
            total = sum(w for _, w in mixed)
            share = self.spec.refusal_share
            sources = [(sources[0][0], share)] + [(src, (1 - share) * w / total) for src, w in mixed]

        def make_loader(dp_rank: int, dp_world_size: int, seq_len: int, batch_size: int) -> Any:
            return MixtureLoader(sources, ctx.tokenizer, seq_len=seq_len, batch_size=batch_size,
                                 dp_rank=dp_rank, dp_world_size=dp_world_size, chat=True)

        return run_lm_stage(ctx, self.spec.sft, make_loader)

    # -- data --------------------------------------------------------------------------------

    def build_data(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        spec, ctx, tok = self.spec, self.ctx, self.ctx.tokenizer
        questions = []
        for prompt in iter_prompts(ctx, spec.questions):
            if prompt.meta is None or "bogus" not in prompt.meta or prompt.reference is None:
                raise EngineError(f"stage {ctx.stage_name!r}: question {prompt.id} needs an assistant answer and "
                                  f"meta.bogus (true/false), as synthetic-refusal gives")
            questions.append(prompt)
            if len(questions) == spec.num_questions:
                break
        verifier = ctx.registry.build("verifier", spec.verifier)
        answers = self._sample(questions)
        sft_records, pairs = [], []
        counts = {"questions": len(questions), "bogus": 0, "answered": 0, "refused": 0, "pairs_correct_over_refusal": 0,
                  "pairs_refusal_over_wrong": 0, "pairs_refusal_over_attempt": 0}
        refusal_ids = tok.encode(spec.refusal) + [tok.im_end_id]
        for q, sampled in zip(questions, answers):
            prompt_ids = tok.encode_chat(q.messages, add_generation_prompt=True)[0]
            texts = [tok.decode([t for t in ids if t != tok.im_end_id]) for ids in sampled]
            attempted = [(ids, text) for ids, text in zip(sampled, texts) if not text.lstrip().startswith(spec.refusal_prefix)]

            def pair(chosen: list[int], rejected: list[int], why: str) -> None:
                counts[f"pairs_{why}"] += 1
                pairs.append({"id": q.id, "kind": why, "prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected,
                              "score_first": spec.dpo.first_tokens, "chosen_text": tok.decode(chosen), "rejected_text": tok.decode(rejected)})

            if q.meta["bogus"]:  # type: ignore[index]
                counts["bogus"] += 1
                sft_records.append({"id": q.id, "messages": [*q.messages, {"role": "assistant", "content": q.reference}]})
                if attempted:
                    pair(tok.encode(q.reference) + [tok.im_end_id], attempted[0][0], "refusal_over_attempt")
                continue
            ok = verifier.verify_many([(q.meta, text) for _, text in attempted]) if attempted else []
            right = [ids for (ids, _), good in zip(attempted, ok) if good]
            wrong = [ids for (ids, _), good in zip(attempted, ok) if not good]
            p_correct = len(right) / len(sampled)
            keep = p_correct >= spec.answer_above
            counts["answered" if keep else "refused"] += 1
            answer = q.reference if keep else spec.refusal
            sft_records.append({"id": q.id, "messages": [*q.messages, {"role": "assistant", "content": answer}], "p_correct": p_correct})
            if right:
                pair(tok.encode(q.reference) + [tok.im_end_id], refusal_ids, "correct_over_refusal")
            if wrong and p_correct < spec.refuse_below:
                pair(refusal_ids, wrong[0], "refusal_over_wrong")
        pairs = pairs[: spec.dpo.pairs]
        return sft_records, pairs, {**counts, "pairs": len(pairs)}

    def _sample(self, questions: list[Any]) -> list[list[list[int]]]:
        """``samples`` answers per answerable question (one per bogus question: its attempt)."""
        from phi4_engine.titan.generate import Generator

        spec, tok = self.spec, self.ctx.tokenizer
        rows, owners = [], []
        for i, q in enumerate(questions):
            ids = tok.encode_chat(q.messages, add_generation_prompt=True)[0]
            for _ in range(1 if q.meta["bogus"] else spec.samples):
                rows.append(ids)
                owners.append(i)
        width = max(len(r) for r in rows)
        generator = Generator(load_policy(self.ctx, width + spec.max_new_tokens), eos_ids={tok.im_end_id, tok.eos_id}, pad_id=tok.pad_id)
        out: list[list[list[int]]] = [[] for _ in questions]
        chunk = 64
        starts = list(range(0, len(rows), chunk))

        def sample(share: list[int]) -> list[list[Any]]:
            # each chunk has its own seed: the same answers whichever rank samples it (--nproc)
            done = []
            for start in share:
                done.append(generator.generate_completions(
                    rows[start : start + chunk], max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                    seed=stable_seed(self.ctx.spec.seed, self.ctx.stage_name, start),
                ))  # fmt: skip
                bar.advance(len(done[-1]))
            return done

        with WorkProgress(f"{self.ctx.stage_name}: sampling answers", total=len(rows), unit="answers") as bar:
            for start, completions in zip(starts, ranks.split_work(starts, sample)):
                for owner, c in zip(owners[start : start + chunk], completions):
                    out[owner].append(c.tokens + ([tok.im_end_id] if c.finish_reason == "stop" else []))
        return out
