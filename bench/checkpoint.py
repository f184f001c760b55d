"""Checkpoint integrity cost: the engine's save (torchtitan's DCP save + the sha256 manifest that
commits it) and resume (manifest check + DCP load) against torchtitan's save and load alone.

Both sides are timed on the same checkpoints of one real pretrain run (Phi-4 `tiny` by default:
model + AdamW state): each save is split into torchtitan's ``checkpointer.save`` (the baseline:
what a torchtitan run pays anyway) and the engine's commit (list, hash, write ``manifest.json``
atomically); the run is interrupted every ``--every`` steps by a plugin and resumed by the same
call, so each resume is split into the manifest check of the newest checkpoint and torchtitan's
``checkpointer.load``.

    python bench/checkpoint.py [--flavor tiny] [--steps 12] [--every 4]

Last line: {"bench": "checkpoint", "ours": s, "baseline": s, "unit": "s/save", "ratio": ours/baseline,
"resume_ratio": ..., "amortized": ...}: ratio = (save + commit) / save; resume_ratio = (check +
load) / load; amortized = the commit's share of training time at specs/tiny.json's checkpoint
interval (steps of tiny.json's pretrain shape, timed in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi4_engine import hookimpl  # noqa: E402
from phi4_engine.engine import Engine  # noqa: E402
from phi4_engine.errors import PluginError  # noqa: E402
from phi4_engine.titan import trainer as titan_trainer  # noqa: E402


TINY_INTERVAL = 50  # specs/tiny.json's checkpoint interval


def spec(flavor: str, steps: int) -> dict:
    return {
        "name": "bench-checkpoint",
        "model": {"flavor": flavor},
        "tokenizer": {"kind": "phi4-mini"},
        "checkpoint": {"interval": 2, "keep_latest_k": 0},
        "logging": {"progress": False},
        "stages": [{
            "kind": "pretrain", "steps": steps, "seq_len": 256, "batch_size": 8, "lr": 1e-3,  # tiny.json's shape
            "data": {"sources": [{"kind": "synthetic-prose"}]},
        }],
    }  # fmt: skip


class Interrupt(Exception):
    pass


class Interrupter:
    """Stops the run after the checkpoint of every ``every``-th step (so the next call resumes)."""

    __name__ = "bench-interrupter"

    def __init__(self, every: int) -> None:
        self.every = every
        self.started_at: int | None = None

    @hookimpl
    def phi4_stage_start(self, start_step):
        self.started_at = start_step

    @hookimpl
    def phi4_checkpoint_saved(self, step):
        if step % self.every == 0 and step != self.started_at:
            raise Interrupt(f"interrupted after step {step}")


class Timings:
    """Wraps the trainer's save, commit, integrity check and load with timers."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {"save": [], "commit": [], "check": [], "load": [], "step": []}
        cls = titan_trainer.Phi4Trainer
        self._timed(cls, "train_step", "step")
        self._timed(cls, "_save", "save")
        self._timed(cls, "_commit", "commit")
        self._timed(cls, "_committed_resume_step", "check")
        original_train = cls.train
        timings = self

        def train(self):  # time torchtitan's checkpointer.load on this trainer's checkpointer
            load = self.checkpointer.load

            def timed_load(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return load(*args, **kwargs)
                finally:
                    if kwargs.get("step", args[0] if args else -1) > 0:
                        timings.seconds["load"].append(time.perf_counter() - start)

            self.checkpointer.load = timed_load
            return original_train(self)

        cls.train = train

    def _timed(self, cls, name: str, key: str) -> None:
        original = getattr(cls, name)
        seconds = self.seconds[key]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - start)

        setattr(cls, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="interrupt and resume after every N-th step")
    args = parser.parse_args()
    os.environ.setdefault("PHI4_ENGINE_PROGRESS", "0")
    timings = Timings()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        calls = 0
        while True:
            calls += 1
            engine = Engine(spec(args.flavor, args.steps), plugins=[Interrupter(args.every)], run_dir=run_dir)
            try:
                engine.run()
                break
            except PluginError as exc:
                if "interrupted after" not in str(exc):
                    raise
        ckpts = run_dir / "pretrain" / "checkpoints"
        sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in ckpts.iterdir()]
    size_mb = statistics.median(sizes) / 1e6
    # The check before the stage's first start finds no checkpoint: only resumes count.
    check = timings.seconds["check"][1:]
    save, commit, load = (statistics.median(timings.seconds[k]) for k in ("save", "commit", "load"))
    check_s = statistics.median(check)
    print(f"{args.flavor}: {len(timings.seconds['save'])} saves of {size_mb:.1f} MB, {len(check)} resumes ({calls} calls)")
    print(f"{'':<28}{'median s':>10}{'MB/s':>10}")
    for label, value in (("torchtitan save", save), ("  + manifest commit", commit), ("manifest check", check_s),
                         ("torchtitan load", load)):  # fmt: skip
        print(f"{label:<28}{value:>10.4f}{size_mb / value:>10.0f}")
    ratio, resume_ratio = (save + commit) / save, (check_s + load) / load
    step = statistics.median(timings.seconds["step"][1:])
    amortized = commit / (TINY_INTERVAL * step)
    print(f"ratio save+commit / save = {ratio:.3f}; check+load / load = {resume_ratio:.3f}")
    print(f"the commit costs {100 * amortized:.2f}% of training time at specs/tiny.json's interval "
          f"({TINY_INTERVAL} steps of {step:.3f} s)")
    print(json.dumps({"bench": "checkpoint", "ours": round(save + commit, 5), "baseline": round(save, 5), "unit": "s/save",
                      "ratio": round(ratio, 4), "resume_ratio": round(resume_ratio, 4), "checkpoint_mb": round(size_mb, 1),
                      "amortized": round(amortized, 5)}))  # fmt: skip


if __name__ == "__main__":
    main()
