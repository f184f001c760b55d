"""Running a stage's evaluations on its starting and final weights.

``eval.json`` in the stage folder holds ``{"before": {name: metrics}, "after": {...}}``;
"before" is computed once (kept across resumes) from the checkpoint the stage starts from.
The same numbers go to TensorBoard (``eval/<name>/<metric>``, tagged before/after) and the
ledger entry of the stage. Each evaluation's result is also kept in ``<run>/eval-memo/`` under a
key of the weights (their checkpoint manifest) and the evaluation (spec, plugin, version), so a
stage's "before" that is the previous stage's "after" is not computed twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from phi4_engine import ranks
from phi4_engine.errors import EngineError
from phi4_engine.rundir import atomic_write


@dataclass
class EvalContext:
    """What an evaluation factory may use."""

    tokenizer: Any
    registry: Any
    spec_dir: str
    seed: int
    build_source: Callable[[Any], Any]
    """Builds a data source from a nested source spec."""


@dataclass(frozen=True)
class WeightsRef:
    """A checkpoint and how to rebuild the model around it."""

    checkpoint: str
    flavor: str
    rope_theta: float


def load_weights(ref: WeightsRef, vocab_size: int, max_seq_len: int) -> Any:
    from phi4_engine.titan.generate import load_model

    return load_model(ref.checkpoint, flavor=ref.flavor, vocab_size=vocab_size, rope_theta=ref.rope_theta, max_seq_len=max_seq_len)


class Evaluator:
    """The evaluations declared by one stage."""

    def __init__(self, stage_spec: Any, ctx: EvalContext, stage_dir: str) -> None:
        self.path = os.path.join(stage_dir, "eval.json")
        self.memo_dir = Path(stage_dir).parent / "eval-memo"
        self.ctx = ctx
        self.evals = [(e.name or e.kind, ctx.registry.build("evaluation", e, ctx)) for e in stage_spec.evaluations]
        # What defines an evaluation's result besides the weights: its spec and the plugin
        # (name, distribution, version) that registered its kind.
        self.identities = [
            orjson.dumps([e.model_dump(mode="json"), str(ctx.registry.get("evaluation", e.kind).origin)],
                         option=orjson.OPT_SORT_KEYS)
            for e in stage_spec.evaluations
        ]  # fmt: skip
        names = [n for n, _ in self.evals]
        if len(set(names)) != len(names):
            raise EngineError(f"stage {stage_spec.name!r}: two evaluations share a name; set 'name' on one")

    def __bool__(self) -> bool:
        return bool(self.evals)

    def results(self) -> dict[str, Any]:
        if os.path.exists(self.path):
            return orjson.loads(open(self.path, "rb").read())
        return {}

    def run(self, label: str, weights: WeightsRef, *, force: bool = False) -> dict[str, dict[str, float]]:
        """Evaluate ``weights`` as ``label`` ("before"/"after"); cached in eval.json unless ``force``.

        Under --nproc every rank runs the evaluations (the built-in ones deal their problems
        over the ranks: ``ranks.split_work``); rank 0 writes eval.json and its view of what is
        cached is everyone's."""
        saved = ranks.from_main(self.results())
        if label in saved and not force:
            return saved[label]
        keys = self._memo_keys(weights)
        memo = ranks.from_main({} if force else self._memo_read(keys))
        max_len = max(getattr(e, "max_seq_len", 0) for _, e in self.evals) or 1024
        model = None
        out = {}
        for (name, evaluation), key in zip(self.evals, keys):
            if key in memo:
                out[name] = memo[key]
                continue
            if model is None:
                model = load_weights(weights, self.ctx.tokenizer.vocab_size, max_len)
            out[name] = evaluation.run(model)
            if key is not None and ranks.is_main():
                atomic_write(self.memo_dir / f"{key}.json", orjson.dumps(out[name]))
        saved[label] = out
        saved.setdefault("weights", {})[label] = weights.checkpoint
        if ranks.is_main():
            atomic_write(Path(self.path), orjson.dumps(saved, option=orjson.OPT_INDENT_2))
        return out

    def _memo_keys(self, weights: WeightsRef) -> list[str | None]:
        """One key per evaluation: the weights (their checkpoint's manifest: the sha256 of every
        file) and the evaluation's identity. A stage's "before" is usually the previous stage's
        "after": the same evaluation of the same weights is computed once per run."""
        manifest = Path(weights.checkpoint) / "manifest.json"
        if not manifest.is_file():
            return [None] * len(self.evals)
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        return [hashlib.sha256(digest.encode() + identity).hexdigest()[:32] for identity in self.identities]

    def _memo_read(self, keys: list[str | None]) -> dict[str, Any]:
        paths = {key: self.memo_dir / f"{key}.json" for key in keys if key is not None}
        return {key: orjson.loads(path.read_bytes()) for key, path in paths.items() if path.is_file()}


def log_to_tensorboard(stage_dir: str, results: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(stage_dir, "tb")) as writer:
        for label in ("before", "after"):
            for name, metrics in results.get(label, {}).items():
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{name}/{key}/{label}", value, step)
