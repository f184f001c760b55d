"""What every stage has: its spec base, and the context the engine hands to its factory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from phi4_engine.evaluation import WeightsRef
from phi4_engine.spec.base import EvaluationRef, SpecModel, resolve_path


def _existing_path(value: str, info: ValidationInfo) -> str:
    return resolve_path(value, info)


class StageSpec(SpecModel):
    """Fields common to every stage kind; each kind adds ``kind: Literal[...]`` and its own."""

    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    """Stage name, also its folder in the run directory (defaults to the kind)."""
    evaluations: list[EvaluationRef] = Field(default_factory=list)  # type: ignore[valid-type]
    """Evaluations run on the stage's starting weights and on its final weights."""
    init_from: Annotated[str, AfterValidator(_existing_path)] | None = None
    """A Hugging Face ``Phi3ForCausalLM`` folder (e.g. from ``phi4-engine export``) to start
    from instead of the previous stage's final weights; converted once into ``<stage>/init/``."""

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("kind"), str):
            data = {**data, "name": data["kind"]}
        return data


@dataclass
class StageContext:
    """Everything a stage may use: resolved spec, folders, plugins, handoff, and hooks."""

    run_dir: str
    stage_name: str
    spec: Any
    """The whole validated RunSpec."""
    stage_spec: Any
    registry: Any
    """The Engine's :class:`phi4_engine.manager.Registry` (build data sources, judges…)."""
    tokenizer: Any
    init_checkpoint: str | None
    """Previous stage's final checkpoint (weights only) — None for the first stage."""
    notify: Callable[..., None]
    """``notify(hook_name, **kwargs)`` calls a lifecycle hook."""
    init_weights: WeightsRef | None = None
    """``init_checkpoint`` with the model it belongs to (flavor, RoPE base), for loading it."""
    init_weights_sha256: str | None = None
    """The previous stage's ``weights_sha256``: keys caches computed from the starting weights."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.run_dir, self.stage_name)

    @property
    def spec_dir(self) -> str:
        return self.extra.get("spec_dir", ".")
