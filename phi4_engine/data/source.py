"""What a data source is: a deterministic, restartable stream of documents or chat records.

Sources are built by plugin factories (``phi4_register_data_sources``) from a spec model that
derives from :class:`DataSourceSpec`. The mixture (``phi4_engine.data.mixture``) draws from
several sources by weight, tokenizes, and packs; a source itself knows nothing of tokens,
except a pre-tokenized one (``shards``), whose documents carry their ids in ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

from pydantic import Field

from phi4_engine.spec.base import SpecModel

if TYPE_CHECKING:
    import numpy as np


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
    work_dir: str | None = None
    """The stage's ``<run>/<stage>/data/`` folder, for what a source writes down (quarantined
    records…); None outside a run (notebooks, tests), where sources keep such things in memory."""


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
    tokens: np.ndarray | Sequence[int] | None = field(default=None, compare=False)
    """Pre-tokenized text: the ids ``encode(text)`` would give, without the trailing EOS (a
    numpy array view for ``shards``). When set, the mixture uses it instead of tokenizing."""


@runtime_checkable
class DataSource(Protocol):
    """A finite, ordered collection of documents, read the same way every time.

    ``documents(start)`` yields from position ``start`` (0-based) to the end: that is how a
    loader resumes without replaying. ``len()`` may be unknown (None) for files not yet read.
    A source of pre-tokenized documents may also have ``check_tokenizer(tokenizer)``, which
    raises :class:`~phi4_engine.errors.DataError` when its ids come from another tokenizer.
    """

    name: str

    def documents(self, start: int = 0) -> Iterator[Document]: ...

    def __len__(self) -> int: ...
