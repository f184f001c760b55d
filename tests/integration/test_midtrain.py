"""midtrain on tiny.json: long context is learnt, RoPE base changes, weights are handed over."""

from __future__ import annotations

import json

import pytest

from phi4_engine.engine import Engine
from tests.conftest import SPECS


@pytest.mark.slow
def test_midtrain_lowers_long_context_loss(tmp_path):
    # tiny.json with shorter budgets: measured 1.07 -> 0.75 at 4x the pretrain length
    # (pretrain 150 steps, midtrain 40), while the loss at the pretrain length stays put.
    engine = Engine.from_file(
        SPECS / "tiny.json",
        overrides={"stages.pretrain.steps": 150, "stages.midtrain.steps": 40},
        run_dir=tmp_path / "run",
    )
    result = engine.run(["pretrain", "midtrain"])
    pre, mid = result.stages["pretrain"].summary, result.stages["midtrain"].summary
    spec = engine.validate()
    long_len = 4 * spec.stages[0].seq_len
    assert spec.stages[1].seq_len == long_len

    evals = json.loads((tmp_path / "run" / "midtrain" / "eval.json").read_text())
    before = evals["before"]["heldout"][f"loss@{long_len}"]
    after = evals["after"]["heldout"][f"loss@{long_len}"]
    assert after < before - 0.15, (before, after)
    assert mid["eval"]["after"]["heldout"][f"loss@{long_len}"] == after  # also in the ledger

    saved = json.loads((tmp_path / "run" / "midtrain" / "model.json").read_text())
    assert saved["rope_theta"] == 250_000 == spec.stages[1].rope_theta
    assert json.loads((tmp_path / "run" / "pretrain" / "model.json").read_text())["rope_theta"] == 10_000

    # The handoff: midtrain started from exactly the weights pretrain finished with.
    assert mid["init_checkpoint"] == pre["final_checkpoint"]
    assert mid["init_weights_sha256"] == pre["weights_sha256"]
    shares = {d["name"]: d["tokens"] for d in mid["data"]}
    assert abs(shares["long"] / sum(shares.values()) - 0.3) < 0.03
    assert mid["long_documents"]["long"]["min_tokens"] == 2 * spec.stages[0].seq_len
