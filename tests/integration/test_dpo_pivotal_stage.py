"""The dpo-pivotal stage end to end on a small model: search → one-token pairs → DPO.

A model trained for a few steps never answers arithmetic right, so every question would fall
below the 0.2–0.8 window. The oracle here is a third-party verifier plugin (registered on the
Engine like any plugin) that accepts a completion when it contains a digit 3 — an outcome a
small random-ish policy reaches about half the time, so the search has something to bisect.
"""

from __future__ import annotations

import json

import orjson
import pytest

from phi4_engine.engine import Engine
import tests.plugins
from tests.conftest import run_cli, write_spec

pytestmark = pytest.mark.slow

ARITH = {"kind": "synthetic-arithmetic", "format": "chat", "operations": [1, 1], "max_operand": 20}


def _spec(pairs: int = 4) -> dict:
    return {
        "version": 1, "name": "pts-test", "seed": 0,
        "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "checkpoint": {"interval": 100, "keep_latest_k": 2},
        "stages": [
            {"kind": "sft", "steps": 10, "seq_len": 256, "batch_size": 4, "lr": 0.003,
             "data": {"sources": [{**ARITH, "name": "chat", "num_documents": 200}]}},
            {"kind": "dpo-pivotal", "pairs": pairs, "max_new_tokens": 12, "seq_len": 96, "batch_size": 2, "lr": 1e-4,
             "pts": {"rollouts": 8, "p_gap": 0.25, "trajectories": 2, "questions_per_round": 6,
                     "verifier": {"kind": "has-three"}},
             "prompts": [{**ARITH, "name": "tasks", "num_documents": 60}]},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def pivotal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pivotal")
    spec = write_spec(tmp / "spec.json", _spec())
    result = Engine.from_file(spec, run_dir=tmp / "run", plugins=[tests.plugins]).run()
    return result, tmp / "run", spec


def test_pairs_are_single_pivotal_tokens(pivotal_run):
    result, run_dir, _ = pivotal_run
    pairs = [orjson.loads(l) for l in (run_dir / "dpo-pivotal" / "data" / "pairs.jsonl").read_bytes().splitlines()]
    assert len(pairs) == 4 == result.stages["dpo-pivotal"].summary["pairs"]
    for p in pairs:
        assert len(p["chosen_ids"]) == len(p["rejected_ids"]) == 1 and p["chosen_ids"] != p["rejected_ids"]
        assert abs(p["p_after"] - p["p_before"]) >= 0.25
        assert p["prompt_ids"][len(p["prompt_ids"]) - len(p["prefix_ids"]):] == p["prefix_ids"]  # question + prefix
        pivotal = p["chosen_ids"] if p["p_after"] > p["p_before"] else p["rejected_ids"]
        assert p[f"{p['pivotal']}_ids"] == pivotal


def test_trained_from_the_previous_stage_with_a_search_report(pivotal_run):
    result, run_dir, _ = pivotal_run
    summary = result.stages["dpo-pivotal"].summary
    assert summary["init_weights_sha256"] == result.stages["sft"].summary["weights_sha256"]
    assert summary["steps"] == 2
    report = summary["pts"]
    assert report["searched"] >= 1 and report["rollouts"] > 0 and report["pairs_kept"] == 4
    assert sum(report["p_jump_histogram"].values()) == report["pivotal_tokens"]


def test_pts_command_prints_the_report(pivotal_run):
    _, run_dir, _ = pivotal_run
    out = run_cli("pts", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "rollouts spent" in out.stdout and "p-jump histogram" in out.stdout
    report = json.loads(run_cli("pts", str(run_dir), "--json").stdout)
    assert report["pairs_kept"] == 4


def test_search_resumes_from_its_cache_without_new_rollouts(pivotal_run, tmp_path):
    _, run_dir, spec = pivotal_run
    # The run is lost after the search (its pairs file and checkpoints gone), the cache survives:
    ledger = json.loads((run_dir / "ledger.json").read_text())
    ledger["stages"]["dpo-pivotal"]["status"] = "failed"
    (run_dir / "ledger.json").write_text(json.dumps(ledger))
    (run_dir / "dpo-pivotal" / "data" / "pairs.jsonl").unlink()
    first = (run_dir / "dpo-pivotal" / "data" / "pairs-report.json").read_bytes()
    result = Engine.from_file(spec, run_dir=run_dir, plugins=[tests.plugins]).run()
    report = result.stages["dpo-pivotal"].summary["pts"]
    assert report["rollouts"] == 0 and report["rollouts_cached"] == json.loads(first)["rollouts"]
    assert report["pairs_kept"] == 4
