"""Data primitives: sources of documents and the LM mixture loader.

``MixtureLoader`` is imported lazily (it needs torch), so plugins that only import the source
types keep ``phi4-engine validate`` / ``plugins`` / ``schema`` free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phi4_engine.data.source import DataSource, DataSourceSpec, Document, SourceContext

if TYPE_CHECKING:
    from phi4_engine.data.mixture import MixtureLoader

__all__ = ["DataSource", "DataSourceSpec", "Document", "MixtureLoader", "SourceContext"]


def __getattr__(name: str):
    if name == "MixtureLoader":
        from phi4_engine.data.mixture import MixtureLoader

        return MixtureLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
