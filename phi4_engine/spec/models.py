"""The core of a run spec: what every run has, whatever plugins are installed.

Stage, tokenizer, parallelism… sections are plugin kinds (see :mod:`phi4_engine.spec.base`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from phi4_engine.spec.base import ParallelismRef, SpecModel, StageRef, TokenizerRef

# Kept in step with phi4_engine.titan.phi4.FLAVORS (a test checks); listed here so validating a
# spec does not import torch.
MODEL_FLAVORS = ("14b", "tiny", "debug")


class ModelSection(SpecModel):
    """The Phi-4 architecture to train."""

    flavor: Literal["14b", "tiny", "debug"] = "14b"
    """Shape preset: ``14b`` is the paper's model; ``tiny``/``debug`` are CPU-sized."""
    rope_theta: float = Field(10_000.0, gt=0)
    """RoPE base for stages that do not set their own (the paper raises it to 250K in midtrain)."""


class CheckpointSection(SpecModel):
    """DCP checkpointing, shared by every stage."""

    interval: int = Field(100, ge=1)
    """Save every N optimizer steps (and always at the last step)."""
    keep_latest_k: int = Field(2, ge=0)
    """Keep this many newest checkpoints per stage (0 keeps all; otherwise at least 2, so the
    newest complete one survives while the next is being written)."""
    on_corrupt: Literal["fail", "previous"] = "fail"
    """A checkpoint failing its sha256 manifest at resume: ``fail`` stops with the file named;
    ``previous`` moves it to ``<stage>/checkpoints-quarantine/`` and resumes from the one before."""

    @field_validator("keep_latest_k")
    @classmethod
    def _two_or_more(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (keep all) or >= 2: the newest may still be being written")
        return value


class LoggingSection(SpecModel):
    """Where metrics go. Changing these between a run and its resume is allowed."""

    tensorboard: bool = True
    """Write TensorBoard event files to ``<stage>/tb/``."""
    jsonl: bool = True
    """Write one JSON line per step to ``<stage>/metrics.jsonl``."""
    progress: bool = True
    """Show a progress bar per stage on the terminal."""


def _default_tokenizer() -> dict:
    return {"kind": "phi4"}


def _default_parallelism() -> dict:
    return {"kind": "auto"}


class RunSpec(SpecModel):
    """A whole run: the model, the tokenizer, and the ordered stages of the recipe."""

    version: Literal[1] = 1
    """Spec format version."""
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Run name; the default run directory is ``runs/<name>``."""
    seed: int = 0
    """Seeds model init, data order and sampling; same spec + seed gives the same losses."""
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerRef = Field(default_factory=_default_tokenizer, validate_default=True)  # type: ignore[assignment]
    """Tokenizer kind (``phi4``: cl100k + Phi-4 specials; ``phi4-mini``: small CPU vocabulary)."""
    parallelism: ParallelismRef = Field(default_factory=_default_parallelism, validate_default=True)  # type: ignore[assignment]
    """How the model is spread over devices."""
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    stages: list[StageRef] = Field(min_length=1)  # type: ignore[valid-type]
    """The stages, run in order; each starts from the previous one's final weights."""

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "RunSpec":
        seen: set[str] = set()
        for stage in self.stages:
            name = stage.name  # type: ignore[attr-defined]
            if name in seen:
                raise ValueError(f"two stages are named {name!r}; give one a distinct 'name'")
            seen.add(name)
        return self
