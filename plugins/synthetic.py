"""Built-in synthetic data sources: the embedded default corpus.

Five kinds, one generator module each: ``synthetic-arithmetic`` (worked arithmetic problems),
``synthetic-code`` (small Python functions with tests), ``synthetic-prose`` (simple stories) and
``synthetic-academic`` (definition/theorem/citation paragraphs), ``synthetic-refusal`` (bogus
questions that call for a refusal, and their answerable twins).

Document ``i`` of a source depends only on ``(run seed, source name, i)``: its generator is
seeded with ``random.Random(f"{seed}:{name}:{i}")`` (string seeds hash with SHA-512, stable
across processes and ``PYTHONHASHSEED``), where ``name`` is the spec's ``name`` or, by default,
the kind. Any document can be computed on its own, so ``documents(start)`` resumes in O(1), and
two sources of one kind with different names yield different documents.

With ``format: "chat"`` a document is a user/assistant pair (``messages``, for SFT) instead of
text; ``meta`` carries the task data (answer, tests) either way.
"""

from __future__ import annotations

import random
from typing import Callable, ClassVar, Iterator, Literal

from pydantic import Field, field_validator

from phi4_engine import hookimpl
from phi4_engine.data.source import DataSourceSpec, Document, SourceContext
from phi4_engine.plugins import synthetic_academic, synthetic_arithmetic, synthetic_code, synthetic_prose, synthetic_refusal
from phi4_engine.plugins.synthetic_sample import Sample

Generator = Callable[[random.Random], Sample]


class SyntheticSourceSpec(DataSourceSpec):
    """Fields shared by the synthetic kinds."""

    generator_options: ClassVar[tuple[str, ...]] = ()
    """Spec fields passed to the generator as keyword arguments."""

    num_documents: int = Field(default=2000, gt=0)
    """Number of documents in one epoch of this source."""
    format: Literal["text", "chat"] = "text"
    """``text``: plain documents for LM stages; ``chat``: user/assistant ``messages`` for SFT."""


class SyntheticArithmeticSpec(SyntheticSourceSpec):
    """Arithmetic problems (2–3 operations on numbers below 100) with worked steps and ``Answer: n``."""

    kind: Literal["synthetic-arithmetic"]
    """Source kind."""
    operations: tuple[int, int] = (2, 3)
    """Fewest and most operations per problem (a difficulty knob for small models)."""
    max_operand: int = Field(default=99, ge=2, le=99)
    """Largest number in a problem (a difficulty knob for small models)."""

    generator_options: ClassVar[tuple[str, ...]] = ("operations", "max_operand")

    @field_validator("operations")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 3:
            raise ValueError("operations must be [low, high] with 1 <= low <= high <= 3")
        return value


class SyntheticCodeSpec(SyntheticSourceSpec):
    """Small Python functions with docstrings and ``assert`` tests."""

    kind: Literal["synthetic-code"]
    """Source kind."""


class SyntheticProseSpec(SyntheticSourceSpec):
    """Simple templated English stories from a small vocabulary."""

    kind: Literal["synthetic-prose"]
    """Source kind."""


class SyntheticAcademicSpec(SyntheticSourceSpec):
    """"Academic" paragraphs: definitions, theorem-like statements, citations."""

    kind: Literal["synthetic-academic"]
    """Source kind."""


class SyntheticRefusalSpec(SyntheticSourceSpec):
    """Bogus questions (missing quantities, division by zero, made-up entities) that call for a
    refusal, mixed with their answerable arithmetic twins; ``meta.bogus`` tells which."""

    kind: Literal["synthetic-refusal"]
    """Source kind."""
    share_bogus: float = Field(default=0.5, ge=0, le=1)
    """Probability that a document is the bogus variant of its problem."""
    operations: tuple[int, int] = (1, 1)
    """Operations per problem of the answerable twins (as ``synthetic-arithmetic``)."""
    max_operand: int = Field(default=20, ge=2, le=99)

    generator_options: ClassVar[tuple[str, ...]] = ("share_bogus", "operations", "max_operand")
    _ordered = field_validator("operations")(SyntheticArithmeticSpec._ordered.__func__)  # type: ignore[attr-defined]


KINDS: dict[str, tuple[type[SyntheticSourceSpec], Generator, str]] = {
    "synthetic-arithmetic": (SyntheticArithmeticSpec, synthetic_arithmetic.generate, "arith"),
    "synthetic-code": (SyntheticCodeSpec, synthetic_code.generate, "code"),
    "synthetic-prose": (SyntheticProseSpec, synthetic_prose.generate, "prose"),
    "synthetic-academic": (SyntheticAcademicSpec, synthetic_academic.generate, "academic"),
    "synthetic-refusal": (SyntheticRefusalSpec, synthetic_refusal.generate, "refusal"),
}
"""kind → (spec model, generator, document id prefix)."""


class SyntheticSource:
    """A deterministic, random-access :class:`~phi4_engine.data.DataSource` over a generator."""

    def __init__(self, kind: str, *, seed: int, num_documents: int = 2000, format: str = "text",
                 name: str | None = None, options: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(KINDS)}")
        if num_documents <= 0:
            raise ValueError("num_documents must be > 0")
        if format not in ("text", "chat"):
            raise ValueError(f"format must be 'text' or 'chat', got {format!r}")
        self.kind = kind
        self.name = name or kind
        self.seed = seed
        self.num_documents = num_documents
        self.format = format
        _, self._generate, self._prefix = KINDS[kind]
        self.options = dict(options or {})

    def __len__(self) -> int:
        return self.num_documents

    def sample(self, index: int) -> Sample:
        """The raw task behind document ``index`` (any index, also beyond one epoch)."""
        return self._generate(random.Random(f"{self.seed}:{self.name}:{index}"), **self.options)

    def document(self, index: int) -> Document:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"{self.name}: document {index} out of range 0..{self.num_documents - 1}")
        s = self.sample(index)
        doc_id = f"{self._prefix}-{index:06d}"
        if self.format == "chat":
            messages = ({"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.response})
            return Document(id=doc_id, messages=messages, meta=s.meta)
        return Document(id=doc_id, text=s.text, meta=s.meta)

    def documents(self, start: int = 0) -> Iterator[Document]:
        for index in range(max(start, 0), self.num_documents):
            yield self.document(index)


def _factory(kind: str) -> Callable[[SyntheticSourceSpec, SourceContext], SyntheticSource]:
    def build(spec: SyntheticSourceSpec, ctx: SourceContext) -> SyntheticSource:
        options = {key: getattr(spec, key) for key in spec.generator_options}
        return SyntheticSource(kind, seed=ctx.seed, num_documents=spec.num_documents, format=spec.format,
                               name=spec.name, options=options)

    build.__name__ = build.__qualname__ = f"build_{kind.replace('-', '_')}_source"
    return build


@hookimpl
def phi4_register_data_sources(register):
    for kind, (spec_model, _, _) in KINDS.items():
        register(kind, spec_model, _factory(kind))
