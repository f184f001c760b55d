"""What a data source is: a deterministic, restartable stream of documents or chat records.

Sources are built by plugin factories (``phi4_register_data_sources``) from a spec model that
derives from :class:`DataSourceSpec`. The mixture (``phi4_engine.data.mixture``) draws from
several sources by weight, tokenizes, and packs; a source itself knows nothing of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, runtime_checkable

from pydantic import Field

from phi4_engine.spec.base import SpecModel


class DataSourceSpec(SpecModel):
    """Fields every data source kind has. Subclasses add ``kind: Literal[...]`` and their own."""

    name: str | None = None
    """Label used in reports (defaults to the kind)."""
    weight: float = Field(default=1.0, gt=0)
    """Share of the mixture's tokens drawn from this source (normalized over all sources)."""


@dataclass(frozen=True)
class SourceContext:
    """Run-time facts a source factory may need."""

    base_dir: str
    """Directory of the spec file; relative paths resolve against it."""
    seed: int
    """The run's seed; synthetic sources derive their RNG from it (and their own name)."""


@dataclass(frozen=True)
class Document:
    """One record: plain text for LM stages, or chat ``messages`` for sft-style stages."""

    id: str
    """Stable id, unique within its source (e.g. ``path:line`` or ``arith-000123``)."""
    text: str = ""
    messages: tuple[dict[str, str], ...] | None = None
    """Chat records: ``({"role": "user", "content": ...}, {"role": "assistant", ...})``."""
    meta: dict[str, Any] | None = None
    """Task data for verifiers/judges (e.g. the expected answer, unit tests)."""


@runtime_checkable
class DataSource(Protocol):
    """A finite, ordered collection of documents, read the same way every time.

    ``documents(start)`` yields from position ``start`` (0-based) to the end: that is how a
    loader resumes without replaying. ``len()`` may be unknown (None) for files not yet read.
    """

    name: str

    def documents(self, start: int = 0) -> Iterator[Document]: ...

    def __len__(self) -> int: ...
