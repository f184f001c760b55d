"""A run SIGKILLed again and again — in every stage kind, twice in one stage, at a stage
boundary, during PTS rollouts and judged candidate generation — and re-run with the same command
each time ends bit-identical to an uninterrupted run: the same weights (sha256 over every
tensor), the same loss, learning rate, gradient norm and batch digest at every step, TensorBoard
steps without gaps or duplicates, the same preference pairs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import write_spec
from tests.reliability.conftest import (
    committed,
    exists,
    ledger,
    metrics,
    run_driver,
    run_until_killed,
    six_stage_spec,
    tensorboard_steps,
)

pytestmark = pytest.mark.slow

# Trained folders: every stage, the refusal stage as its two phases.
TRAINED = ["pretrain", "midtrain", "sft", "dpo-pivotal", "dpo-judge", "refusal/sft", "refusal/dpo"]
PAIRS = ["dpo-pivotal/data/pairs.jsonl", "dpo-judge/data/pairs.jsonl", "refusal/data/pairs.jsonl"]


def _kill_points(run: Path) -> list[tuple[str, object, float]]:
    """(label, trigger, largest random delay after it): eleven kills."""
    return [
        ("pretrain, after step-4", committed(run / "pretrain", 4), 0.15),
        ("pretrain again (second resume)", committed(run / "pretrain", 8), 0.1),
        # The midtrain folder exists before the ledger says the stage runs: a kill between them.
        ("stage boundary: midtrain starting", exists(run / "midtrain"), 0.0),
        ("midtrain", committed(run / "midtrain", 2), 0.05),
        ("sft", committed(run / "sft", 4), 0.1),
        ("dpo-pivotal: during the search", exists(run / "dpo-pivotal" / "data" / "pts-cache.jsonl"), 0.05),
        ("dpo-pivotal: training", committed(run / "dpo-pivotal", 2), 0.05),
        ("dpo-judge: generating candidates", exists(run / "dpo-judge" / "data" / "candidates.jsonl"), 0.02),
        ("dpo-judge: training", committed(run / "dpo-judge", 2), 0.05),
        ("refusal: sft phase", committed(run / "refusal" / "sft", 2), 0.05),
        ("refusal: dpo phase", committed(run / "refusal" / "dpo", 2), 0.05),
    ]


def test_killed_everywhere_ends_identical_to_an_uninterrupted_run(tmp_path):
    spec = write_spec(tmp_path / "spec.json", six_stage_spec())
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_driver("run", str(spec), "--run-dir", str(straight))
    assert done.returncode == 0, done.stderr

    rng = random.Random(20261202)
    args = ["run", str(spec), "--run-dir", str(killed)]
    landed = []
    for label, trigger, delay in _kill_points(killed):
        if trigger():
            continue  # an earlier kill's delay carried the run past this point
        outcome = run_until_killed(args, trigger, rng=rng, max_delay=delay)
        assert outcome == "killed", f"{label}: the run finished before the kill"
        running = [n for n, e in ledger(killed)["stages"].items() if e.get("status") == "running"]
        landed.append((label, running))
    resumed = run_driver(*args)
    assert resumed.returncode == 0, resumed.stderr

    # Every stage kind was interrupted at least once, and the pretrain stage twice.
    kinds = [stage for _, running in landed for stage in running]
    assert set(kinds) == {"pretrain", "midtrain", "sft", "dpo-pivotal", "dpo-judge", "refusal"}, landed
    assert kinds.count("pretrain") >= 2, landed

    a, b = ledger(straight)["stages"], ledger(killed)["stages"]
    for name in a:
        assert b[name]["status"] == "done"
        assert b[name]["weights_sha256"] == a[name]["weights_sha256"], f"{name}: weights differ"
        assert b[name].get("init_weights_sha256") == a[name].get("init_weights_sha256"), name
    for folder in TRAINED:
        rows_a, rows_b = metrics(straight / folder), metrics(killed / folder)
        assert [r["step"] for r in rows_b] == list(range(1, len(rows_a) + 1)), f"{folder}: steps repeat or skip"
        assert rows_b == rows_a, f"{folder}: loss, lr, grad_norm or batch differ"
        assert tensorboard_steps(killed / folder) == [r["step"] for r in rows_a], f"{folder}: TensorBoard steps"
    for pairs in PAIRS:
        assert (killed / pairs).read_bytes() == (straight / pairs).read_bytes(), pairs
    # Nothing left half-written in the way: no uncommitted checkpoint among the kept ones.
    for folder in TRAINED:
        for step_dir in (killed / folder / "checkpoints").iterdir():
            assert (step_dir / "manifest.json").exists(), step_dir
