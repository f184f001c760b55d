"""Built-in data source ``shards``: one source of a directory made by ``phi4-engine data prepare``.

Documents carry their token ids (zero-copy views of memory-mapped ``uint32`` shards, format in
:mod:`phi4_engine.data.shards`), so LM stages skip tokenizing. Every shard's size is checked
when the source is built and its sha256 the first time it is read (``verify: false`` skips the
hash); a mismatch, or shards prepared with another tokenizer than the run's, is a one-line
:class:`~phi4_engine.errors.DataError`.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import ValidationInfo, field_validator, model_validator

from phi4_engine import hookimpl
from phi4_engine.data.source import DataSourceSpec, SourceContext
from phi4_engine.spec.base import resolve_path


class ShardsSourceSpec(DataSourceSpec):
    """Pre-tokenized documents from a prepared shards directory (``phi4-engine data prepare``)."""

    kind: Literal["shards"]
    """Source kind."""
    path: str
    """The prepared directory (holds ``manifest.json``); relative paths resolve against the spec's directory."""
    source: str | None = None
    """Which source of the manifest to read (may be omitted when it holds only one)."""
    verify: bool = True
    """Check each shard's sha256 against the manifest on first read (sizes are always checked)."""

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)

    @model_validator(mode="after")
    def _known_source(self, info: ValidationInfo) -> "ShardsSourceSpec":
        if not (info.context or {}).get("check_files", True):
            return self
        manifest = os.path.join(self.path, "manifest.json")
        try:
            with open(manifest, "rb") as f:
                names = [s["name"] for s in json.loads(f.read())["sources"]]
        except FileNotFoundError:
            raise ValueError(f"{self.path} is not a prepared shards directory (no manifest.json; run 'phi4-engine data prepare')") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: unreadable manifest ({type(exc).__name__})") from None
        if self.source is None and len(names) != 1:
            raise ValueError(f"{self.path} holds sources {', '.join(names)}; choose one with 'source'")
        if self.source is not None and self.source not in names:
            raise ValueError(f"source {self.source!r} is not in {manifest} (sources: {', '.join(names)})")
        return self


def build_shards_source(spec: ShardsSourceSpec, ctx: SourceContext):
    from phi4_engine.data.shards import ShardSource

    path = spec.path if os.path.isabs(spec.path) else os.path.join(ctx.base_dir, spec.path)
    return ShardSource(path, spec.source, name=spec.name, verify=spec.verify)


@hookimpl
def phi4_register_data_sources(register):
    register("shards", ShardsSourceSpec, build_shards_source)
