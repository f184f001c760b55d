"""Reliability tests: real runs in subprocesses, killed or faulted, then checked file by file.

``run_driver`` runs ``phi4-engine`` through ``tests/reliability/driver.py`` (test plugins, fault
injection); ``run_until_killed`` SIGKILLs it once a trigger file appears.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import orjson

from tests.conftest import REPO

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


def driver_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.reliability.driver", *args]


def driver_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PHI4_ENGINE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


def run_driver(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(driver_cmd(*args), cwd=REPO, env=driver_env(**env), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def run_until_killed(args: list[str], trigger: Callable[[], bool], *, rng: random.Random, max_delay: float = 0.05,
                     timeout: float = 300) -> str:  # fmt: skip
    """Start the CLI, SIGKILL it once ``trigger()`` holds (plus a random delay up to
    ``max_delay``); returns where the kill landed: ``"killed"`` or ``"finished"`` (the trigger
    never held before the run ended — the caller decides whether that is acceptable)."""
    proc = subprocess.Popen(driver_cmd(*args), cwd=REPO, env=driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + timeout
    try:
        while not trigger():
            if proc.poll() is not None:
                err = proc.stderr.read().decode()
                assert proc.returncode == 0, err
                return "finished"
            assert time.time() < deadline, "trigger never held"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed" if proc.returncode == -signal.SIGKILL else "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


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
