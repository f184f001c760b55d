"""The Engine: load a spec, resolve its plugins, validate, and run its stages in order.

Notebook use::

    engine = Engine.from_file("specs/tiny.json", overrides={"stages.pretrain.steps": 50})
    engine.validate()
    result = engine.run()            # or engine.run_stage("pretrain")
    result.stages["pretrain"].metrics
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import orjson

from phi4_engine import ranks
from phi4_engine.data.source import SourceContext
from phi4_engine.errors import EngineError, SpecError, UsageError
from phi4_engine.evaluation import EvalContext, Evaluator, WeightsRef, load_weights, log_to_tensorboard
from phi4_engine.manager import PluginHost, Registry
from phi4_engine.rundir import RunDir, now
from phi4_engine.spec import CompiledSpec, RunSpec
from phi4_engine.spec.load import apply_override, canonical_json, load_with_extends, sha256_of
from phi4_engine.stage import StageContext


@dataclass
class StageResult:
    name: str
    kind: str
    status: str
    """``done`` (ran now), ``skipped`` (already finished in this run dir)."""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary.get("metrics", {})


@dataclass
class RunResult:
    run_dir: str
    spec_sha256: str
    stages: dict[str, StageResult] = field(default_factory=dict)


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str]
    kinds: dict[str, list[str]]


class Engine:
    """One run spec plus one plugin manager. Cheap to build; nothing runs until ``run``."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        *,
        origin: str = "<spec>",
        base_dir: str | os.PathLike[str] = ".",
        run_dir: str | os.PathLike[str] | None = None,
        plugins: Iterable[Any] = (),
    ) -> None:
        self.raw_spec: dict[str, Any] = orjson.loads(orjson.dumps(dict(spec)))
        self.origin = origin
        self.base_dir = str(base_dir)
        self.host = PluginHost(tuple(plugins))
        self.registry: Registry = self.host.collect_registry()
        self.compiled = CompiledSpec(
            {c: {k: r.spec_model for k, r in regs.items()} for c, regs in self.registry.kinds.items()}
        )
        self._run_dir = run_dir
        self._validated: RunSpec | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | Iterable[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        plugins: Iterable[Any] = (),
    ) -> "Engine":
        """Load a spec file (following ``extends``) and apply ``overrides``.

        ``overrides`` is either ``{"stages.sft.lr": 2e-5}`` or CLI-style ``["stages.sft.lr=2e-5"]``.
        """
        path = Path(path)
        data = load_with_extends(path)
        if overrides:
            items = (
                [f"{k}={orjson.dumps(v).decode()}" for k, v in overrides.items()]
                if isinstance(overrides, Mapping)
                else list(overrides)
            )
            for assignment in items:
                apply_override(data, assignment, origin=f"{path}: --set")
        return cls(data, origin=str(path), base_dir=path.resolve().parent, run_dir=run_dir, plugins=plugins)

    # -- inspection -------------------------------------------------------------------------

    def validate(self, *, check_files: bool = True) -> RunSpec:
        """Validate the spec against this engine's plugins; raises SpecError (one line)."""
        if self._validated is None:
            self._validated = self.compiled.validate(
                self.raw_spec, origin=self.origin, base_dir=self.base_dir, check_files=check_files
            )
        return self._validated

    @property
    def spec(self) -> RunSpec:
        return self.validate()

    def resolved_spec(self) -> dict[str, Any]:
        return self.validate().model_dump(mode="json")

    def plugins(self) -> list[PluginInfo]:
        return [PluginInfo(**d) for d in self.host.describe(self.registry)]

    def schema(self) -> dict[str, Any]:
        return self.compiled.json_schema()

    def plan(self, hardware: Any, *, tp: int = 1, dpo_row_tokens: int = 2048) -> list[Any]:
        """Per stage tokens, steps, FLOPs, memory per GPU and days on ``hardware``
        (:class:`phi4_engine.plan.Hardware`); nothing is built or run."""
        from phi4_engine.plan import plan_stages

        spec = self.validate(check_files=False)
        vocab = self.registry.build("tokenizer", spec.tokenizer).vocab_size
        try:
            return plan_stages(spec, vocab, hardware, tp=tp, dpo_row_tokens=dpo_row_tokens)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    @property
    def run_dir(self) -> RunDir:
        path = self._run_dir or Path("runs") / self.validate().name
        return RunDir(path)

    # -- running ----------------------------------------------------------------------------

    def run(self, stages: Iterable[str] | None = None, *, reshard: bool = False) -> RunResult:
        """Run every stage not finished yet (or only ``stages``), in spec order.

        ``reshard`` lets an unfinished stage continue under a different number of processes
        (its checkpoint is resharded; the global batches stay the same; recorded in the ledger).

        Under torchrun every rank calls this: all train, rank 0 alone writes the run directory
        and runs evaluations (:mod:`phi4_engine.ranks`)."""
        with ranks.launched_group():
            return self._run(stages, reshard)

    def _run(self, stages: Iterable[str] | None, reshard: bool) -> RunResult:
        spec = self.validate()
        selected = list(stages) if stages is not None else None
        names = [s.name for s in spec.stages]  # type: ignore[attr-defined]
        for name in selected or []:
            if name not in names:
                raise SpecError(f"{self.origin}: --stages: no stage named {name!r} (stages: {', '.join(names)})")

        resolved = self.resolved_spec()
        sha = sha256_of(resolved)
        self._check_hardware(spec)
        rundir = self.run_dir
        ledger = rundir.read_ledger()
        started = {
            name for name, entry in ledger.get("stages", {}).items()
            if entry.get("status") in ("running", "failed", "done") and rundir.stage_dir(name).is_dir()
        }  # fmt: skip
        changes = rundir.check_resume(resolved, self.origin, started)
        ranks.barrier()  # every rank has read the run dir as it was before rank 0 writes to it
        if changes and ranks.is_main():
            ledger.setdefault("spec_changes", []).append({"time": now(), "changes": changes})
            print(f"phi4-engine: spec changed since this run dir's last run (allowed; recorded in ledger.json): "
                  f"{'; '.join(changes)}", file=sys.stderr)  # fmt: skip
        rundir.write_spec(resolved, canonical_json(resolved), sha)
        ledger.update(
            spec_sha256=sha,
            spec_name=spec.name,
            plugins={p.name: f"{p.distribution} {p.version}" for p in self.plugins()},
        )
        ledger.setdefault("stages", {})
        rundir.write_ledger(ledger)

        self._notify("phi4_run_start", run_dir=str(rundir.path), spec=resolved)
        result = RunResult(run_dir=str(rundir.path), spec_sha256=sha)
        tokenizer = self.registry.build("tokenizer", spec.tokenizer)
        previous: dict[str, Any] = {}
        invalidated = False
        current: str | None = None
        last_selected = max(names.index(n) for n in selected) if selected else len(names) - 1
        try:
            for stage_spec in spec.stages[: last_selected + 1]:
                name, kind = stage_spec.name, stage_spec.kind  # type: ignore[attr-defined]
                entry = ledger["stages"].get(name, {})
                finished = entry.get("status") == "done" and rundir.stage_dir(name).is_dir()
                if entry.get("status") == "done" and not finished:
                    invalidated = True  # its folder was deleted: re-run it and everything after
                if finished and not invalidated:
                    previous = entry
                    result.stages[name] = StageResult(name, kind, "skipped", entry)
                    continue
                if invalidated and entry:
                    # Built on weights that no longer exist: keep its folder (nothing is deleted)
                    # but out of the way, so the stage starts fresh instead of resuming.
                    stale = rundir.stage_dir(name)
                    if stale.exists() and ranks.is_main():
                        stale.rename(stale.with_name(f"{name}.invalidated-{int(now())}"))
                    ledger["stages"][name] = {"status": "invalidated", "kind": kind}
                if selected is not None and name not in selected:
                    if entry.get("status") != "done" or invalidated:
                        raise EngineError(
                            f"stage {name!r} must run before the selected ones but is not finished; "
                            f"add it to --stages"
                        )
                    continue
                current = name
                summary = self._run_one(rundir, ledger, stage_spec, tokenizer, previous, reshard)
                previous = summary
                result.stages[name] = StageResult(name, kind, "done", summary)
                invalidated = invalidated or entry.get("status") == "done"
        except BaseException as exc:
            self._notify("phi4_run_error", run_dir=str(rundir.path), stage=current, error=exc)
            raise
        return result

    def _check_hardware(self, spec: RunSpec) -> None:
        """What the parallelism section asks for must exist here (float8 needs torchao and an
        SM89+ GPU or emulation): refused before anything is written or trained."""
        from phi4_engine.titan.layouts import check

        check(self.registry.build("parallelism", spec.parallelism))

    def run_stage(self, name: str) -> StageResult:
        """Run one stage (the ones before it must be finished in this run dir)."""
        return self.run([name]).stages[name]

    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        stage: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Assistant replies from a finished stage's final weights (default: the last finished).

        ``conversations`` are chat message lists; generation is batched with a KV cache and
        stops at ``<|im_end|>``. Deterministic for a given ``seed``.
        """
        from phi4_engine.titan.generate import Generator

        _, entry = self._finished_entry(stage)
        tokenizer = self.registry.build("tokenizer", self.validate().tokenizer)
        prompt_len = max(len(tokenizer.encode_chat(c, add_generation_prompt=True)[0]) for c in conversations)
        model = load_weights(self._weights(entry), tokenizer.vocab_size, prompt_len + max_new_tokens)
        generator = Generator(model, eos_ids={tokenizer.im_end_id, tokenizer.eos_id}, pad_id=tokenizer.pad_id)
        return generator.generate_text(
            tokenizer, conversations, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )

    def export(self, out: str | os.PathLike[str], *, stage: str | None = None, format: str = "hf",
               dtype: str = "float32") -> Path:
        """Write a finished stage's final weights (default: the last finished stage) as a Hugging
        Face ``Phi3ForCausalLM`` directory with tokenizer files and chat template."""
        if format != "hf":
            raise UsageError(f"export: unknown format {format!r}; known: hf")
        from phi4_engine.titan.hf import export_hf

        name, entry = self._finished_entry(stage)
        model = entry.get("model") or {}
        tokenizer = self.registry.build("tokenizer", self.validate().tokenizer)
        try:
            return export_hf(
                entry["final_checkpoint"], out, flavor=model.get("flavor", self.validate().model.flavor),
                vocab_size=tokenizer.vocab_size, rope_theta=self._weights(entry).rope_theta,
                max_position_embeddings=model.get("seq_len", 4096), tokenizer=tokenizer, dtype=dtype,
            )  # fmt: skip
        except ValueError as exc:
            raise UsageError(f"export {name}: {exc}") from None

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str], *, plugins: Iterable[Any] = ()) -> "Engine":
        """The engine of an existing run, from the resolved spec it wrote."""
        path = Path(run_dir) / "spec.json"
        if not path.exists():
            raise EngineError(f"{run_dir}: not a run directory (no spec.json)")
        return cls(orjson.loads(path.read_bytes()), origin=str(path), base_dir=Path(run_dir), run_dir=run_dir, plugins=plugins)

    def evaluate(self, stage: str | None = None) -> dict[str, Any]:
        """Run a finished stage's evaluations again on its final weights (default: the last one)."""
        name, entry = self._finished_entry(stage)
        stage_spec = next(s for s in self.validate().stages if s.name == name)  # type: ignore[attr-defined]
        tokenizer = self.registry.build("tokenizer", self.validate().tokenizer)
        evaluator = Evaluator(stage_spec, self._eval_context(tokenizer), str(self.run_dir.stage_dir(name)))
        if not evaluator:
            raise EngineError(f"stage {name!r} declares no evaluations")
        return {"stage": name, "after": evaluator.run("after", self._weights(entry), force=True)}

    def _finished_entry(self, stage: str | None) -> tuple[str, dict[str, Any]]:
        ledger = self.run_dir.read_ledger()
        done = {n: e for n, e in ledger.get("stages", {}).items() if e.get("status") == "done"}
        if not done:
            raise EngineError(f"run dir {self.run_dir.path} has no finished stage to generate from")
        if stage is None:
            order = [s.name for s in self.validate().stages if s.name in done]  # type: ignore[attr-defined]
            stage = order[-1]
        if stage not in done:
            raise EngineError(f"stage {stage!r} has not finished in {self.run_dir.path} (finished: {', '.join(done)})")
        return stage, done[stage]

    def _imported_start(self, stage_spec: Any, stage_dir: Path, tokenizer: Any) -> dict[str, Any]:
        """A stage's ``init_from`` (a Hugging Face Phi-3/Phi-4 folder) as a DCP checkpoint under
        ``<stage>/init/``, converted once; returns a ledger-like entry for it."""
        from phi4_engine.titan.hf import import_hf

        folder = stage_dir / "init"
        facts_path = folder / "facts.json"
        if not facts_path.exists():
            try:
                facts = import_hf(stage_spec.init_from, folder / "checkpoint")
            except ValueError as exc:
                raise EngineError(f"stage {stage_spec.name!r}: init_from {stage_spec.init_from}: {exc}") from None
            digest = hashlib.sha256()
            for path in sorted(Path(stage_spec.init_from).glob("*.safetensors")):
                with open(path, "rb") as f:
                    digest.update(path.name.encode() + hashlib.file_digest(f, "sha256").digest())
            facts["weights_sha256"] = "hf-" + digest.hexdigest()
            facts_path.write_bytes(orjson.dumps(facts))
        facts = orjson.loads(facts_path.read_bytes())
        spec = self.validate()
        if facts["flavor"] != spec.model.flavor or facts["vocab_size"] != tokenizer.vocab_size:
            raise EngineError(
                f"stage {stage_spec.name!r}: init_from {stage_spec.init_from} holds a {facts['flavor']} model with "
                f"vocab {facts['vocab_size']}; the spec says {spec.model.flavor} with vocab {tokenizer.vocab_size}"
            )
        return {"final_checkpoint": str(folder / "checkpoint"), "weights_sha256": facts["weights_sha256"],
                "model": {"flavor": facts["flavor"], "rope_theta": facts["rope_theta"]}}

    def _run_one(self, rundir: RunDir, ledger: dict[str, Any], stage_spec: Any, tokenizer: Any, previous: dict[str, Any],
                 reshard: bool = False) -> dict[str, Any]:  # fmt: skip
        name, kind = stage_spec.name, stage_spec.kind
        stage_dir = rundir.stage_dir(name)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if stage_spec.init_from:
            previous = self._imported_start(stage_spec, stage_dir, tokenizer)
        init = previous.get("final_checkpoint")
        factory = self.registry.get("stage", kind).factory
        if isinstance(factory, type):  # known before anything is recorded (else once built)
            self._check_distributed(stage_spec, factory)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        before = ledger["stages"].get(name, {})
        reshards = list(before.get("reshards", []))
        if before.get("status") in ("running", "failed") and before.get("world_size", world_size) != world_size:
            # Continuing under another layout reorders floating-point reductions: not the same
            # run bit for bit, so it takes an explicit --reshard (and is recorded).
            if not reshard:
                raise SpecError(
                    f"{self.origin}: stage {name!r} was started with {before['world_size']} processes and is being "
                    f"resumed with {world_size}; identity fields changed: world_size: {before['world_size']} -> "
                    f"{world_size} (resume with --nproc {before['world_size']}, pass --reshard to continue "
                    f"with {world_size}, or delete {stage_dir} to redo the stage)"
                )
            reshards.append({"from": before["world_size"], "to": world_size, "time": now()})
        ledger["stages"][name] = {
            **ledger["stages"].get(name, {}),
            "world_size": world_size,
            **({"reshards": reshards} if reshards else {}),
            "status": "running",
            "kind": kind,
            "started": now(),
            "init_checkpoint": init,
        }
        rundir.write_ledger(ledger)
        ctx = StageContext(
            run_dir=str(rundir.path),
            stage_name=name,
            spec=self.validate(),
            stage_spec=stage_spec,
            registry=self.registry,
            tokenizer=tokenizer,
            init_checkpoint=init,
            notify=self._notify,
            init_weights=self._weights(previous) if init else None,
            init_weights_sha256=previous.get("weights_sha256"),
            extra={"spec_dir": self.base_dir},
        )
        runner = self.registry.build("stage", stage_spec, ctx)
        self._check_distributed(stage_spec, runner)
        evaluator = Evaluator(stage_spec, self._eval_context(tokenizer), str(stage_dir))
        try:
            # every rank evaluates (the problems are dealt over the ranks); rank 0 writes
            if evaluator and init:
                evaluator.run("before", self._weights(previous))
            summary = runner.run()
            if evaluator:
                evaluator.run("after", self._weights(summary))
                ranks.barrier()
                summary["eval"] = evaluator.results()
                if ranks.is_main():
                    log_to_tensorboard(str(stage_dir), summary["eval"], summary.get("steps", 0))
            ranks.barrier()
        except BaseException as exc:
            ledger["stages"][name].update(status="failed", finished=now())
            try:
                rundir.write_ledger(ledger)
            except OSError as unwritable:  # e.g. the disk that just filled up: keep the first error
                if not isinstance(exc, EngineError):
                    raise
                exc.args = (f"{exc} (the ledger could not record the failure: {unwritable.strerror}; it still "
                            "says running, and a rerun resumes the stage as after a kill)", *exc.args[1:])  # fmt: skip
            raise
        ledger["stages"][name].update(status="done", finished=now(), **summary)
        rundir.write_ledger(ledger)
        self._notify("phi4_stage_end", run_dir=str(rundir.path), stage=name, stage_dir=str(stage_dir), summary=summary)
        return ledger["stages"][name]

    @staticmethod
    def _check_distributed(stage_spec: Any, runner: Any) -> None:
        if ranks.world_size() > 1 and not getattr(runner, "distributed", False):
            raise EngineError(
                f"stage {stage_spec.name!r} ({stage_spec.kind}) runs in one process only (its stage class does not "
                f"declare distributed = True); run it without --nproc (the stages before it can use several: --stages)"
            )

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Lifecycle hooks run on rank 0 only (one set of logs per run)."""
        if ranks.is_main():
            self.host.notify(hook_name, **kwargs)

    def _eval_context(self, tokenizer: Any) -> EvalContext:
        spec = self.validate()
        source_ctx = SourceContext(base_dir=self.base_dir, seed=spec.seed)
        return EvalContext(
            tokenizer=tokenizer,
            registry=self.registry,
            spec_dir=self.base_dir,
            seed=spec.seed,
            build_source=lambda source_spec: self.registry.build("data_source", source_spec, source_ctx),
        )

    def _weights(self, entry: dict[str, Any]) -> WeightsRef:
        model = entry.get("model") or {}
        return WeightsRef(
            checkpoint=entry["final_checkpoint"],
            flavor=model.get("flavor", self.validate().model.flavor),
            rope_theta=model.get("rope_theta", self.validate().model.rope_theta),
        )
