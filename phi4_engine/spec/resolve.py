"""Build an Engine's spec models after its plugins load.

Plugin spec models annotate plugin-dependent fields with a :class:`KindRef` (``list[DataSourceRef]``,
``JudgeRef | None``…). Here each reference becomes the discriminated union (on ``kind``) of the
kinds registered in this Engine's registry, producing *new* model classes — nothing global is
mutated, so two engines with different plugins coexist in one process.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from phi4_engine.spec.base import KindRef, SpecModel


def _union_of(models: list[type[BaseModel]], category: str) -> Any:
    if not models:
        # No plugin provides this category: any input fails with a readable message.
        return create_model(
            f"No{category.title().replace('_', '')}Registered",
            __base__=SpecModel,
            kind=(Literal[f"<no {category} kind registered>"], ...),
        )
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="kind")]


class SpecResolver:
    """Turns static spec models into per-engine models with concrete unions."""

    def __init__(self, kinds_by_category: dict[str, dict[str, type[BaseModel]]]) -> None:
        self._cache: dict[type, type] = {}
        self._raw = kinds_by_category
        self.unions: dict[str, Any] = {}
        for category in kinds_by_category:
            self.union(category)

    def union(self, category: str) -> Any:
        """The union of ``category``'s kinds, resolving their own references first."""
        if category not in self.unions:
            self.unions[category] = None  # in progress: a reference back here is a cycle
            models = [self.model(m) for m in self._raw.get(category, {}).values()]
            self.unions[category] = _union_of(models, category)
        if self.unions[category] is None:
            raise RuntimeError(f"spec category {category!r} refers to itself")
        return self.unions[category]

    def model(self, cls: type[BaseModel]) -> type[BaseModel]:
        if cls in self._cache:
            return self._cache[cls]
        self._cache[cls] = cls  # provisional, breaks cycles
        overrides: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            new = self.annotation(info.annotation)
            if new is info.annotation:
                continue
            if typing.get_origin(new) is Annotated:
                # A field typed directly as a union of kinds: its own FieldInfo (default,
                # description) would shadow the union's discriminator, so merge them.
                base, *extra = typing.get_args(new)
                info = FieldInfo.merge_field_infos(info, *[m for m in extra if isinstance(m, FieldInfo)])
                new = base
            overrides[name] = (new, info)
        if overrides:
            resolved = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, **overrides)
            resolved.__doc__ = cls.__doc__
            self._cache[cls] = resolved
        return self._cache[cls]

    def annotation(self, ann: Any) -> Any:
        if isinstance(ann, type) and issubclass(ann, KindRef):
            return self.union(ann.category)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return self.model(ann)
        origin = typing.get_origin(ann)
        if origin is None:
            return ann
        args = typing.get_args(ann)
        if origin is Annotated:
            inner = self.annotation(args[0])
            return ann if inner is args[0] else Annotated[(inner, *args[1:])]
        new_args = tuple(self.annotation(a) for a in args)
        if all(n is a for n, a in zip(new_args, args)):
            return ann
        if origin in (Union, types.UnionType):
            return Union[new_args]
        if origin is Literal:
            return ann
        return origin[new_args] if len(new_args) > 1 else origin[new_args[0]]
