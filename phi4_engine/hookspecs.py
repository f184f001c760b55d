"""Every hook phi4-engine calls, in one place (modelled on pytest's ``hookspec.py``).

Two families:

* **Registration hooks** receive a ``register`` callback and are called once per Engine, right
  after plugins load. Each call of ``register(kind, spec_model, factory)`` adds one *kind*:
  ``kind`` is the string used in specs, ``spec_model`` a :class:`phi4_engine.spec.SpecModel`
  subclass whose ``kind`` field is ``Literal[kind]``, and ``factory`` builds the runtime object
  from a validated instance of that model. A kind registered twice is an error naming both
  plugins.
* **Lifecycle hooks** only observe. They receive plain values and must not change them.
  Their return values are ignored. TensorBoard and JSONL logging are plugins on these hooks.

Hook implementations are marked with :data:`phi4_engine.hookimpl`.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("phi4_engine")

Register = Callable[[str, type, Callable[..., Any]], None]

# ---------------------------------------------------------------------------------------------
# Registration hooks: called once per Engine, in plugin order, after all plugins are loaded.


@hookspec
def phi4_register_stages(register: Register) -> None:
    """Register stage kinds (``pretrain``, ``sft``…).

    ``factory(stage_spec, ctx)`` returns an object with ``run() -> dict`` (the stage's summary
    metrics); ``ctx`` is a :class:`phi4_engine.stage.StageContext`.

    Under ``--nproc N`` every rank calls ``run()``. A stage that supports it says so with a
    class attribute ``distributed = True`` (the engine refuses the others in one line): its
    collectives must match on every rank, rank 0 alone writes files
    (``phi4_engine.ranks.is_main``), decisions read from those files come from rank 0
    (``ranks.from_main``), and work can be dealt over the ranks with ``ranks.split_work``.
    """


@hookspec
def phi4_register_data_sources(register: Register) -> None:
    """Register data-source kinds (``jsonl``, ``synthetic-arithmetic``…).

    ``factory(source_spec, ctx)`` returns a :class:`phi4_engine.data.DataSource`; ``ctx`` is a
    :class:`phi4_engine.data.SourceContext` (spec directory, seed).
    """


@hookspec
def phi4_register_tokenizers(register: Register) -> None:
    """Register tokenizer kinds (``phi4``, ``phi4-mini``).

    ``factory(tokenizer_spec)`` returns a :class:`phi4_engine.tokenizer.Phi4Tokenizer`-like
    object (``encode``, ``decode``, ``vocab_size``, ``eos_id``, chat rendering).
    """


@hookspec
def phi4_register_losses(register: Register) -> None:
    """Register loss kinds (``cross-entropy``, ``dpo-sigmoid``, ``ipo``…).

    ``factory(loss_spec)`` returns a plain description the stage's trainer understands (e.g.
    :class:`phi4_engine.choices.PreferenceLoss`); the math lives in ``phi4_engine.titan``.
    """


@hookspec
def phi4_register_schedulers(register: Register) -> None:
    """Register learning-rate scheduler kinds (``warmup-cosine``, ``warmup-linear``…).

    ``factory(scheduler_spec)`` returns a :class:`phi4_engine.choices.Schedule`.
    """


@hookspec
def phi4_register_parallelisms(register: Register) -> None:
    """Register parallelism kinds (``single``, ``fsdp2``…).

    ``factory(parallelism_spec)`` returns a :class:`phi4_engine.choices.Layout`.
    """


@hookspec
def phi4_register_judges(register: Register) -> None:
    """Register judge kinds: a judge scores (prompt, response) on named dimensions.

    ``factory(judge_spec)`` returns a :class:`phi4_engine.judging.Judge` (``score`` →
    :class:`~phi4_engine.judging.Verdict`, failures as :class:`~phi4_engine.judging.JudgeFailure`,
    never a default score).
    """


@hookspec
def phi4_register_verifiers(register: Register) -> None:
    """Register verifier (oracle) kinds: a verifier accepts or rejects a completion.

    ``factory(verifier_spec)`` returns an object with ``verify(task, completion) -> bool``.
    """


@hookspec
def phi4_register_evaluations(register: Register) -> None:
    """Register evaluation kinds a stage may declare (``heldout-loss``, ``task-accuracy``…).

    ``factory(evaluation_spec, ctx)`` returns an object with ``run(model) -> dict[str, float]``;
    ``ctx`` is a :class:`phi4_engine.evaluation.EvalContext`. Results go to ``<stage>/eval.json``,
    TensorBoard and the ledger, for the stage's starting weights ("before") and final ones.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle hooks: observers only. Called on rank 0 of a run.


@hookspec
def phi4_run_start(run_dir: str, spec: dict[str, Any]) -> None:
    """A run begins: ``spec`` is the resolved spec as plain JSON data."""


@hookspec
def phi4_stage_start(run_dir: str, stage: str, kind: str, stage_dir: str, total_steps: int, start_step: int) -> None:
    """A stage begins (or resumes at ``start_step`` > 0) and will run to ``total_steps``."""


@hookspec
def phi4_step_end(stage: str, stage_dir: str, step: int, metrics: dict[str, float | str]) -> None:
    """An optimizer step finished; ``metrics`` holds at least ``loss``, ``lr`` and ``grad_norm``
    (floats) and ``batch`` (a string: a digest of the step's input ids and labels on rank 0, so
    two runs or a run and its resume can be compared sample for sample)."""


@hookspec
def phi4_checkpoint_saved(stage: str, step: int, path: str) -> None:
    """A committed checkpoint for ``step`` now exists at ``path`` (its sha256 manifest written)."""


@hookspec
def phi4_stage_end(run_dir: str, stage: str, stage_dir: str, summary: dict[str, Any]) -> None:
    """A stage finished; ``summary`` is what the ledger records for it."""


@hookspec
def phi4_run_error(run_dir: str, stage: str | None, error: BaseException) -> None:
    """A run stopped with ``error`` (raised after all implementations ran)."""
