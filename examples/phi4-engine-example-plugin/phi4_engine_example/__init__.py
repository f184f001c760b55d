"""Example third-party plugin: counting exercises as a phi4-engine data source."""

from __future__ import annotations

from typing import Iterator, Literal

from pydantic import Field

from phi4_engine import hookimpl
from phi4_engine.data.source import DataSourceSpec, Document, SourceContext


class CountingSpec(DataSourceSpec):
    """Documents that count upward by a fixed stride: highly learnable, deterministic."""

    kind: Literal["example-counting"]
    num_documents: int = Field(500, gt=0)
    """How many documents the source holds (one epoch)."""
    start: int = Field(1, ge=0)
    """Smallest stride used."""


class CountingSource:
    def __init__(self, spec: CountingSpec, ctx: SourceContext) -> None:
        self.name = spec.name or spec.kind
        self.spec = spec
        self.seed = ctx.seed

    def __len__(self) -> int:
        return self.spec.num_documents

    def _document(self, i: int) -> Document:
        stride = self.spec.start + (i + self.seed) % 7
        first = (i * 13) % 50
        numbers = ", ".join(str(first + stride * k) for k in range(12))
        return Document(id=f"counting-{i}", text=f"Count by {stride} from {first}: {numbers}.")

    def documents(self, start: int = 0) -> Iterator[Document]:
        for i in range(start, self.spec.num_documents):
            yield self._document(i)


@hookimpl
def phi4_register_data_sources(register):
    register("example-counting", CountingSpec, CountingSource)
