"""Base classes every spec model (core or plugin) derives from, and the kind references.

A spec is data: strict (unknown fields are errors), frozen, and never evaluated as code.
Fields whose type depends on which plugins are installed (a stage's data sources, a judge…)
are annotated with a *reference* class such as :class:`DataSourceRef`; the engine replaces each
reference with the discriminated union of the kinds registered in *its* plugin manager
(see :mod:`phi4_engine.spec.resolve`), so plugin kinds validate and appear in the JSON Schema.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, ValidationInfo
from pydantic_core import CoreSchema, core_schema


class SpecModel(BaseModel):
    """Strict, frozen base; field docstrings become JSON-Schema descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KindRef:
    """Placeholder for 'any registered kind of <category>'. Never instantiated.

    The static model accepts anything here (so plugin modules import without an engine); an
    Engine validates only through resolved models, where the placeholder is a real union.
    """

    category: str = ""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.dict_schema()


class StageRef(KindRef):
    category = "stage"


class DataSourceRef(KindRef):
    category = "data_source"


class TokenizerRef(KindRef):
    category = "tokenizer"


class LossRef(KindRef):
    category = "loss"


class SchedulerRef(KindRef):
    category = "scheduler"


class ParallelismRef(KindRef):
    category = "parallelism"


class JudgeRef(KindRef):
    category = "judge"


class VerifierRef(KindRef):
    category = "verifier"


class EvaluationRef(KindRef):
    category = "evaluation"


def resolve_path(value: str, info: ValidationInfo, *, must_exist: bool = True) -> str:
    """Resolve ``value`` against the spec's directory (validation context ``base_dir``).

    Use from a plugin's ``field_validator`` for file fields. Returns an absolute path; raises
    ``ValueError`` (reported by the engine with the spec path and field) when it is missing.
    """
    base = Path((info.context or {}).get("base_dir", "."))
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if must_exist and (info.context or {}).get("check_files", True) and not path.exists():
        raise ValueError(f"file not found: {value} (looked at {path})")
    return str(path)
