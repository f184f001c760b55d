"""The shipped specs/tiny.json, run once through all six stages, then checked.

One run serves every assertion here (6 to 12 minutes on 2 CPU cores, by the CPU): it is the
embedded default exactly as a user runs it (`make demo`); `make test` runs it alone first.
"""

from __future__ import annotations

import json

import pytest

from phi4_engine.engine import Engine
from tests.conftest import SPECS

pytestmark = pytest.mark.slow

# Measured on tiny.json: held-out arithmetic accuracy 0.06 (midtrain) -> 0.38 (sft) over 50
# problems; a binomial standard error there is about 0.07, so +0.15 is a clear, stable margin.
SFT_MARGIN = 0.15


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    engine = Engine.from_file(SPECS / "tiny.json", run_dir=run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as `make demo` runs it (the suite's other worker uses one thread)
    try:
        result = engine.run()
    finally:
        torch.set_num_threads(threads)
    return engine, result, run_dir


def _eval(run_dir, stage):
    return json.loads((run_dir / stage / "eval.json").read_text())


def test_pretrain_learns(tiny_run):
    _, result, _ = tiny_run
    metrics = result.stages["pretrain"].metrics
    assert metrics["loss_last"] < metrics["loss_first"] - 5


def test_midtrain_lowers_long_context_loss(tiny_run):
    engine, result, run_dir = tiny_run
    spec = engine.validate()
    long_len = 4 * spec.stages[0].seq_len
    assert spec.stages[1].seq_len == long_len
    evals = _eval(run_dir, "midtrain")
    before = evals["before"]["heldout"][f"loss@{long_len}"]
    after = evals["after"]["heldout"][f"loss@{long_len}"]
    # Measured: 1.39 -> 0.62 at 4x the pretrain length (and 0.81 -> 0.49 at 1x).
    assert after < before - 0.3, (before, after)
    mid = result.stages["midtrain"].summary
    assert mid["eval"]["after"]["heldout"][f"loss@{long_len}"] == after  # also in the ledger

    saved = json.loads((run_dir / "midtrain" / "model.json").read_text())
    assert saved["rope_theta"] == 250_000 == spec.stages[1].rope_theta
    assert json.loads((run_dir / "pretrain" / "model.json").read_text())["rope_theta"] == 10_000

    pre = result.stages["pretrain"].summary
    assert mid["init_checkpoint"] == pre["final_checkpoint"]
    assert mid["init_weights_sha256"] == pre["weights_sha256"]  # the handoff, proven
    shares = {d["name"]: d["tokens"] for d in mid["data"]}
    assert abs(shares["long"] / sum(shares.values()) - 0.3) < 0.03
    assert mid["long_documents"]["long"]["min_tokens"] == 2 * spec.stages[0].seq_len


def test_sft_beats_midtrain_on_heldout_arithmetic(tiny_run):
    _, result, run_dir = tiny_run
    evals = _eval(run_dir, "sft")
    before = evals["before"]["arithmetic"]["accuracy"]  # the midtrain model
    after = evals["after"]["arithmetic"]["accuracy"]
    assert after >= before + SFT_MARGIN, (before, after)
    sft = result.stages["sft"].summary
    assert sft["init_weights_sha256"] == result.stages["midtrain"].summary["weights_sha256"]


def test_generate_from_the_finished_run(tiny_run):
    engine, _, _ = tiny_run
    question = [{"role": "user", "content": "Compute 7 + 5."}]
    first = engine.generate([question], max_new_tokens=24)
    again = engine.generate([question, question], max_new_tokens=24)
    assert first[0] == again[0] == again[1]  # greedy, batch-independent
    assert "<|im_end|>" not in first[0]


# The DPO rounds are small effects on a 5M-parameter model, within the evaluations' noise (an
# accuracy over 200 problems has a standard error of about 0.035) and they move with the CPU's
# kernels: measured 0.42 -> 0.42 accuracy and judge mean 3.46 -> 3.47 on one Xeon, 0.42 -> 0.40
# and 3.46 -> 3.42 on an AVX-512/AMX one. What holds on any machine: each DPO stage learned its
# pairs (the trained policy prefers the chosen response over the reference model's preference:
# measured mean margin 0.60 / 0.16 nats, positive on 83% / 76% of the pivotal / judge pairs) and
# the model keeps its quality within that noise.
ACCURACY_NOISE, JUDGE_NOISE = 0.05, 0.1


def _learned_its_pairs(engine, result, run_dir, stage):
    import orjson

    from phi4_engine.preference import preference_pairs
    from phi4_engine.titan.dpo import compute_reference_logps

    folder = run_dir / stage / "data"
    pairs = preference_pairs([orjson.loads(line) for line in (folder / "pairs.jsonl").read_bytes().splitlines()])
    (cached,) = folder.glob("ref-logps-*.json")
    reference = orjson.loads(cached.read_bytes())["logps"]
    model = json.loads((run_dir / stage / "model.json").read_text())
    pad_id = engine.registry.build("tokenizer", engine.validate().tokenizer).pad_id
    policy = compute_reference_logps(
        result.stages[stage].summary["final_checkpoint"], pairs, flavor=model["flavor"], vocab_size=model["vocab_size"],
        rope_theta=model["rope_theta"], seq_len=model["seq_len"], pad_id=pad_id,
    )  # fmt: skip
    margins = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference)]
    mean, positive = sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)
    assert mean > 0 and positive > 0.6, (stage, mean, positive)


def test_dpo_pivotal_learns_its_pairs_and_keeps_arithmetic_accuracy(tiny_run):
    engine, result, run_dir = tiny_run
    evals = _eval(run_dir, "dpo-pivotal")
    assert evals["weights"]["before"] == result.stages["sft"].summary["final_checkpoint"]  # "before" = the sft model
    _learned_its_pairs(engine, result, run_dir, "dpo-pivotal")
    before, after = evals["before"]["arithmetic"]["accuracy"], evals["after"]["arithmetic"]["accuracy"]
    assert after >= before - ACCURACY_NOISE, (before, after)
    pairs = (run_dir / "dpo-pivotal" / "data" / "pairs.jsonl").read_text().splitlines()
    assert pairs and result.stages["dpo-pivotal"].summary["pts"]["pivotal_tokens"] >= len(pairs)


def test_dpo_judge_learns_its_pairs_and_keeps_the_judge_score(tiny_run):
    engine, result, run_dir = tiny_run
    _learned_its_pairs(engine, result, run_dir, "dpo-judge")
    evals = _eval(run_dir, "dpo-judge")
    before, after = evals["before"]["judged"], evals["after"]["judged"]
    assert after["mean"] >= before["mean"] - JUDGE_NOISE, (before, after)
    assert after["failed"] == 0 and after["judged"] == 200


def test_refusal_declines_bogus_questions_and_keeps_answering(tiny_run):
    _, _, run_dir = tiny_run
    evals = _eval(run_dir, "refusal")
    before, after = evals["before"]["refusal"], evals["after"]["refusal"]
    # Measured: bogus not-attempted 0.00 -> 0.96; answerable correct 0.37 -> 0.43.
    assert after["bogus_not_attempted"] >= before["bogus_not_attempted"] + 0.5, (before, after)
    assert after["answerable_correct"] >= before["answerable_correct"] - 0.05, (before, after)


def test_each_stage_starts_from_the_previous_one(tiny_run):
    _, result, _ = tiny_run
    stages = list(result.stages.values())
    assert [s.name for s in stages] == ["pretrain", "midtrain", "sft", "dpo-pivotal", "dpo-judge", "refusal"]
    for previous, stage in zip(stages, stages[1:]):
        assert stage.summary["init_weights_sha256"] == previous.summary["weights_sha256"], stage.name
