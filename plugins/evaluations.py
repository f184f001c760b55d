"""Built-in evaluations: held-out loss at given lengths, and task accuracy by greedy decoding."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.spec.base import DataSourceRef, SpecModel, VerifierRef


class _EvalSpec(SpecModel):
    name: str = ""
    """Key of this evaluation's results (defaults to the kind)."""


class HeldoutLossSpec(_EvalSpec):
    """Mean next-token loss on held-out documents packed to each length."""

    kind: Literal["heldout-loss"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Held-out documents (not used for training)."""
    lengths: list[int] = Field(min_length=1)
    """Sequence lengths to evaluate at, e.g. [4096, 16384]."""
    sequences: int = Field(4, ge=1)
    """Sequences per length."""


class HeldoutLoss:
    def __init__(self, spec: HeldoutLossSpec, ctx: Any) -> None:
        self.spec = spec
        self.tokenizer = ctx.tokenizer
        self.source = ctx.build_source(spec.source)
        self.max_seq_len = max(spec.lengths)

    def _stream(self, tokens_needed: int) -> list[int]:
        stream: list[int] = []
        for doc in self.source.documents():
            stream += self.tokenizer.encode(doc.text) + [self.tokenizer.eos_id]
            if len(stream) >= tokens_needed:
                return stream
        raise ValueError(f"held-out source {self.source.name!r} has only {len(stream)} tokens; {tokens_needed} needed")

    def run(self, model: Any) -> dict[str, float]:
        import torch  # plugins load with every CLI call; torch only when evaluating

        out = {}
        for length in self.spec.lengths:
            stream = self._stream(self.spec.sequences * (length + 1))
            chunks = torch.tensor(stream[: self.spec.sequences * (length + 1)]).view(self.spec.sequences, length + 1)
            losses = []
            for row in chunks:
                with torch.no_grad():
                    logits = model(row[None, :-1])
                losses.append(torch.nn.functional.cross_entropy(logits[0].float(), row[1:]).item())
            out[f"loss@{length}"] = sum(losses) / len(losses)
        return out


class TaskAccuracySpec(_EvalSpec):
    """Share of held-out problems whose greedy answer is right."""

    kind: Literal["task-accuracy"]
    source: DataSourceRef  # type: ignore[valid-type]
    """Chat records (user question, assistant answer) with ``meta.answer``, e.g. synthetic-arithmetic in chat format."""
    problems: int = Field(50, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    verifier: VerifierRef = Field(default_factory=lambda: {"kind": "math-answer"}, validate_default=True)  # type: ignore[assignment]
    """How an answer is checked: ``math-answer`` (normalized final answer against
    ``meta.answer``) or ``python-tests`` (the code passes the task's tests in the sandbox)."""


class TaskAccuracy:
    def __init__(self, spec: TaskAccuracySpec, ctx: Any) -> None:
        self.spec = spec
        self.tokenizer = ctx.tokenizer
        self.source = ctx.build_source(spec.source)
        self.verifier = ctx.registry.build("verifier", spec.verifier)
        self.max_seq_len = 1024

    def _problems(self) -> list[tuple[list[dict[str, str]], dict[str, Any]]]:
        out = []
        for doc in self.source.documents():
            if doc.messages is None or not doc.meta:
                raise ValueError(f"task-accuracy needs chat records with task meta; {doc.id} has none")
            prompt = [m for m in doc.messages if m["role"] != "assistant"]
            out.append((prompt, doc.meta))
            if len(out) == self.spec.problems:
                break
        return out

    def run(self, model: Any) -> dict[str, float]:
        from phi4_engine.titan.generate import Generator

        problems = self._problems()
        generator = Generator(model, eos_ids={self.tokenizer.im_end_id, self.tokenizer.eos_id}, pad_id=self.tokenizer.pad_id)
        prompts = [self.tokenizer.encode_chat(messages, add_generation_prompt=True)[0] for messages, _ in problems]
        outputs = generator.generate(prompts, max_new_tokens=self.spec.max_new_tokens)
        verdicts = self.verifier.verify_many((meta, self.tokenizer.decode(o)) for o, (_, meta) in zip(outputs, problems))
        return {"accuracy": sum(verdicts) / len(problems), "problems": float(len(problems))}


@hookimpl
def phi4_register_evaluations(register):
    register("heldout-loss", HeldoutLossSpec, HeldoutLoss)
    register("task-accuracy", TaskAccuracySpec, TaskAccuracy)
