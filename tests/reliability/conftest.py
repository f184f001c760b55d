"""Reliability tests: real runs in subprocesses, killed or faulted, then checked file by file.

``run_driver`` runs ``phi4-engine`` through ``tests/reliability/driver.py`` (test plugins, fault
injection) in a process forked from a fork server; ``run_until_killed`` SIGKILLs it once a
trigger file appears.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import orjson

ARITH = {"kind": "synthetic-arithmetic", "operations": [1, 1], "max_operand": 20}
CHAT = {**ARITH, "format": "chat"}


def six_stage_spec() -> dict:
    """Every stage kind, debug-sized: a few seconds of training each, checkpoints every 2 steps."""
    return {
        "version": 1, "name": "reliability", "seed": 0,
        "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "checkpoint": {"interval": 2, "keep_latest_k": 2},
        "stages": [
            {"kind": "pretrain", "steps": 12, "seq_len": 64, "batch_size": 4, "lr": 0.003,
             "scheduler": {"kind": "warmup-cosine", "warmup_steps": 3},
             "data": {"sources": [{**ARITH, "name": "math", "num_documents": 300, "weight": 0.5},
                                  {"kind": "synthetic-prose", "name": "prose", "num_documents": 300, "weight": 0.5}]}},
            {"kind": "midtrain", "steps": 6, "seq_len": 128, "batch_size": 2, "lr": 3e-4,
             "data": {"sources": [{"kind": "synthetic-academic", "name": "long", "num_documents": 100}]}},
            {"kind": "sft", "steps": 8, "seq_len": 128, "batch_size": 4, "lr": 0.003,
             "data": {"sources": [{**CHAT, "name": "chat", "num_documents": 200}]}},
            {"kind": "dpo-pivotal", "pairs": 6, "max_new_tokens": 12, "seq_len": 96, "batch_size": 1, "lr": 1e-4,
             "pts": {"rollouts": 8, "p_gap": 0.25, "trajectories": 2, "questions_per_round": 6,
                     "verifier": {"kind": "has-three"}},
             "prompts": [{**CHAT, "name": "tasks", "num_documents": 60}]},
            {"kind": "dpo-judge", "pairs": 6, "candidates": 2, "prompts_per_batch": 4, "max_new_tokens": 16,
             "seq_len": 96, "batch_size": 1, "lr": 1e-4, "judge": {"kind": "rule"},
             "prompts": [{**CHAT, "name": "prompts", "num_documents": 40}]},
            {"kind": "refusal", "questions": [{"kind": "synthetic-refusal", "format": "chat", "name": "questions",
                                               "num_documents": 40}],
             "num_questions": 16, "samples": 2, "max_new_tokens": 12, "answer_above": 0.0, "refuse_below": 0.0,
             "sft": {"steps": 6, "lr": 0.003, "batch_size": 4, "seq_len": 128},
             "dpo": {"pairs": 6, "lr": 1e-4, "batch_size": 1, "seq_len": 96, "first_tokens": 5}},
        ],
    }  # fmt: skip


_PRELOAD = ["tests.reliability.driver", "phi4_engine.cli", "phi4_engine.engine", "phi4_engine.titan.trainer",
            "phi4_engine.titan.dpo", "phi4_engine.titan.rollouts", "tensorboard"]  # fmt: skip


def fork_server() -> multiprocessing.context.ForkServerContext:
    """One server process per test session imports torch, torchtitan and the engine once;
    every driver run is a fork of it: a real, separate process (SIGKILL kills it, it has its
    own environment and exit status), started in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class Run:
    """A driver run in a forked process; ``finish()`` gives a CompletedProcess."""

    def __init__(self, args: list[str], env: dict[str, str], *, plugins: bool = True, cwd: str | None = None) -> None:
        from tests.reliability.driver import forked_main

        out = tempfile.mkdtemp(prefix="phi4-run-")
        self.stdout, self.stderr, self.args = os.path.join(out, "stdout"), os.path.join(out, "stderr"), args
        env = {"PHI4_ENGINE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **env}
        self.process = fork_server().Process(target=forked_main, args=(args, env, self.stdout, self.stderr),
                                             kwargs={"plugins": plugins, "cwd": cwd})  # fmt: skip
        self.process.start()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            self.process.join()
            raise AssertionError(f"driver run {self.args} did not finish in {timeout}s")
        read = lambda path: open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""  # noqa: E731
        return subprocess.CompletedProcess(self.args, self.process.exitcode, read(self.stdout), read(self.stderr))


def run_driver(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``phi4-engine ARGS`` with the test plugins (and ``PHI4_TEST_FAULT``…) in its own process;
    ``returncode`` is negative for a signal (-9: killed)."""
    return Run(list(args), env).finish(timeout)


def run_until_killed(args: list[str], trigger: Callable[[], bool], *, rng: random.Random, max_delay: float = 0.05,
                     timeout: float = 300) -> str:  # fmt: skip
    """Start the CLI, SIGKILL it once ``trigger()`` holds (plus a random delay up to
    ``max_delay``); returns ``"killed"``, or ``"finished"`` when the run ended first."""
    run = Run(args, {})
    deadline = time.time() + timeout
    while not trigger():
        if not run.process.is_alive():
            done = run.finish()
            assert done.returncode == 0, done.stderr
            return "finished"
        assert time.time() < deadline, "trigger never held"
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    run.kill()
    return "killed" if run.finish().returncode == -signal.SIGKILL else "finished"


def metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def tensorboard_steps(stage_dir: Path, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for ``tag`` (purged steps of a killed run excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir / "tb"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def ledger(run_dir: Path) -> dict:
    return orjson.loads((run_dir / "ledger.json").read_bytes())


def committed(stage_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: (stage_dir / "checkpoints" / f"step-{step}" / "manifest.json").exists()


def exists(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()
