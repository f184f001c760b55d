"""Run specs: strict pydantic models whose plugin sections are unions built per Engine."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from phi4_engine.errors import SpecError
from phi4_engine.spec.base import SpecModel
from phi4_engine.spec.models import RunSpec
from phi4_engine.spec.resolve import SpecResolver

__all__ = ["CompiledSpec", "RunSpec", "SpecModel", "format_location"]


def format_location(loc: tuple[Any, ...], tags: set[str]) -> str:
    """``('stages', 0, 'pretrain', 'data', 'sources', 1, 'jsonl', 'path')`` -> ``stages[0].data.sources[1].path``.

    pydantic puts the discriminator tag of a union member into the location; users never wrote
    it, so it is dropped.
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        prev_is_container = i > 0 and (isinstance(loc[i - 1], int) or loc[i - 1] in _UNION_FIELDS)
        if part in tags and prev_is_container:
            continue
        if part.startswith("function-") or part in ("tagged-union",):
            continue
        out += f".{part}" if out else part
    return out or "(top level)"


# Single-valued fields whose type is a union of kinds (their tag follows the field name).
_UNION_FIELDS = {"tokenizer", "parallelism", "scheduler", "loss", "judge", "verifier", "source"}


class CompiledSpec:
    """The RunSpec model of one Engine: plugin kinds resolved, ready to validate and export."""

    def __init__(self, spec_models: dict[str, dict[str, type[BaseModel]]]) -> None:
        self.resolver = SpecResolver(spec_models)
        self.model: type[RunSpec] = self.resolver.model(RunSpec)  # type: ignore[assignment]
        self.tags = {kind for kinds in spec_models.values() for kind in kinds}

    def validate(self, data: dict[str, Any], *, origin: str, base_dir: str, check_files: bool = True) -> RunSpec:
        try:
            return self.model.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
        except ValidationError as exc:
            raise SpecError(self.describe(exc, origin)) from None

    def describe(self, exc: ValidationError, origin: str) -> str:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = format_location(tuple(first["loc"]), self.tags)
        message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (misspelt?)"
        elif first["type"] == "union_tag_invalid":
            ctx = first.get("ctx", {})
            message = f"unknown kind {ctx.get('tag')!r}; known kinds: {ctx.get('expected_tags')}"
        elif first["type"] == "missing":
            message = "required field is missing"
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        return f"{origin}: {where}: {message}{more}"

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()
