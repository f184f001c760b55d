"""Pivotal Token Search (phi4_engine.pts, phi4_engine.titan.rollouts).

Most tests drive the search with a toy policy whose pivotal token is known: responses are 6
tokens, position 1 is A or B (1/2 each), every other position is uniform filler, and the oracle
accepts with probability ``p_a`` after A and ``p_b`` after B. One test runs the real batched
estimator on a tiny torchtitan model.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from phi4_engine.pts import (
    NO_TOKEN,
    Estimate,
    PivotalTokenSearch,
    PTSCache,
    PTSConfig,
    Question,
    pick_alternative,
    rollout_keys,
    select_trajectories,
    split_point,
    uniform,
)

A, B, STOP = 100, 101, 999
FILLER = list(range(10, 20))
LENGTH, PIVOT = 6, 1


class ToyEstimator:
    """Samples the toy policy with each rollout's own stream, as the protocol asks."""

    verifier_id = "toy@1"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.rollouts = 0
        self.requested: list[tuple[str, tuple[int, ...]]] = []
        self.fail_after = fail_after

    def estimate(self, requests, params):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        out = []
        for req in requests:
            self.requested.append((req.question.id, req.prefix))
            firsts, oks, comps = [], [], []
            for key in rollout_keys(params.seed, req.question.prompt_ids, req.prefix, params.rollouts):
                rng = random.Random(key)
                gen = []
                for pos in range(len(req.prefix), LENGTH):
                    gen.append((A if rng.random() < 0.5 else B) if pos == PIVOT else rng.choice(FILLER))
                full = [*req.prefix, *gen]
                p = req.question.meta["p_a"] if full[PIVOT] == A else req.question.meta["p_b"]
                oks.append(rng.random() < p)
                firsts.append(gen[0] if gen else STOP)
                comps.append(tuple(gen))
            self.rollouts += params.rollouts
            out.append(Estimate(tuple(firsts), tuple(oks), tuple(comps) if req.keep else None))
        return out


def toy_logprobs(items):
    return [[math.log(0.5) if i == PIVOT else math.log(1 / len(FILLER)) for i in range(len(resp))]
            for _, resp in items]  # fmt: skip


def question(qid: str, p_a: float = 0.9, p_b: float = 0.1) -> Question:
    return Question(qid, (1, 2, 3, len(qid)), {"p_a": p_a, "p_b": p_b})


CONFIG = PTSConfig(rollouts=200, p_gap=0.2, trajectories=2, max_rows=400, seed=7)


def records(result):
    return [p.record() for p in result.pairs]


# -- pure functions ----------------------------------------------------------------------------


def test_split_point_is_at_the_cumulative_logprob_midpoint():
    assert split_point([-1.0, -1.0, -1.0, -1.0]) == 2  # cum -1, -2 reaches half of -4 at k = 2
    assert split_point([-10.0, -0.1, -0.1]) == 1  # one surprising token is half the mass
    assert split_point([-0.1, -0.1, -5.0, -0.1]) == 3  # not the index midpoint (2)
    assert split_point([-0.1, -0.1, -10.0]) == 2  # clamped: both halves non-empty
    assert split_point([-3.0, -1.0]) == 1
    assert split_point([0.0, 0.0, 0.0, 0.0]) == 2  # a certain piece falls back to the middle
    with pytest.raises(ValueError):
        split_point([-1.0])


def test_select_trajectories_and_pick_alternative():
    assert select_trajectories([True, True, False, True, False], 3) == [2, 0, 4]
    assert select_trajectories([True, True], 2) == [0, 1]
    est = Estimate((5, 6, 6, 7, 5, NO_TOKEN, 8), (False, False, False, True, False, False, True))
    # failed first tokens, excluding 9: 5 (x2), 6 (x2) -> tie goes to the first seen (5)
    assert pick_alternative(est, 9, success=False) == (5, 2, 0)
    assert pick_alternative(est, 5, success=False) == (6, 2, 0)
    assert pick_alternative(est, 7, success=True) == (8, 1, 1)
    assert pick_alternative(Estimate((7, 7), (True, False)), 7, success=True) is None


def test_rollout_streams_depend_only_on_seed_question_prefix():
    keys = rollout_keys(0, [1, 2], [3], 4)
    assert keys == rollout_keys(0, [1, 2], [3], 8)[:4] and len(set(keys)) == 4
    assert keys != rollout_keys(1, [1, 2], [3], 4) != rollout_keys(0, [1, 2, 3], [], 4)
    draws = [uniform(keys[0], s) for s in range(2000)]
    assert all(0.0 <= d < 1.0 for d in draws) and 0.45 < sum(draws) / len(draws) < 0.55


# -- the search on the toy policy --------------------------------------------------------------


def test_finds_exactly_the_known_pivotal_token_and_forms_the_right_pairs():
    est = ToyEstimator()
    result = PivotalTokenSearch(est, toy_logprobs, CONFIG, policy_id="toy").run([question("q1"), question("q2")])
    rep = result.report
    assert rep["searched"] == 2 and rep["trajectories"] == 4
    assert len(result.pivotal) == 4  # one per trajectory: failed (B) and successful (A), per question
    for piv in result.pivotal:
        assert piv.position == PIVOT and len(piv.prefix) == PIVOT and piv.token in (A, B)
        assert (piv.p_after > piv.p_before) == (piv.token == A)
        assert abs(piv.p_after - (0.9 if piv.token == A else 0.1)) < 0.1
    assert len(result.pairs) == 4 and rep["pairs"] == 4 and rep["no_alternative"] == 0
    for pair, piv in zip(result.pairs, result.pivotal):
        assert (pair.chosen_id, pair.rejected_id) == (A, B)
        assert pair.prefix_ids == piv.prefix and pair.prompt_ids == [1, 2, 3, 2, *piv.prefix]
        assert pair.pivotal == ("chosen" if piv.token == A else "rejected")
    assert {p.pivotal for p in result.pairs} == {"chosen", "rejected"}
    assert sum(rep["p_jump_histogram"].values()) == 4
    assert sum(v for k, v in rep["p_jump_histogram"].items() if float(k.split("-")[0]) < 0.2) == 0
    assert rep["rollouts"] == est.rollouts == rep["estimates_fresh"] * CONFIG.rollouts
    # Bisection, not a scan: far fewer estimates than one per token per trajectory.
    assert rep["estimates"] < 2 + 4 * (LENGTH + 1)


def test_questions_outside_the_window_are_skipped():
    est = ToyEstimator()
    qs = [question("easy", 0.97, 0.97), question("hard", 0.02, 0.02), question("mid")]
    result = PivotalTokenSearch(est, toy_logprobs, CONFIG, policy_id="toy").run(qs)
    rep = result.report
    assert (rep["skipped_high"], rep["skipped_low"], rep["searched"]) == (1, 1, 1)
    assert {p.question_id for p in result.pairs} == {"mid"}
    assert {qid for qid, prefix in est.requested if prefix} == {"mid"}  # only P(empty) for the others


def test_a_given_trajectory_is_searched_instead_of_the_rollouts():
    traj = (FILLER[3], B, FILLER[0], FILLER[1], FILLER[2], FILLER[4])
    q = Question("given", (1, 2, 3, 5), {"p_a": 0.9, "p_b": 0.1}, trajectory=traj)
    result = PivotalTokenSearch(ToyEstimator(), toy_logprobs, CONFIG, policy_id="toy").run([q])
    assert [(p.prefix, p.token) for p in result.pivotal] == [(traj[:1], B)]
    assert [(p.chosen_id, p.rejected_id) for p in result.pairs] == [(A, B)]


def test_cache_makes_a_second_run_spend_no_rollouts(tmp_path):
    qs = [question("q1"), question("q2"), question("skip", 0.97, 0.97)]
    first = PivotalTokenSearch(ToyEstimator(), toy_logprobs, CONFIG, policy_id="toy", cache=tmp_path).run(qs)
    est = ToyEstimator()
    search = PivotalTokenSearch(est, toy_logprobs, CONFIG, policy_id="toy", cache=tmp_path)
    second = search.run(qs)
    assert est.calls == 0 and second.report["rollouts"] == 0
    assert second.report["estimates_cached"] == first.report["estimates_fresh"]
    assert second.report["rollouts_cached"] == first.report["rollouts"]
    assert records(second) == records(first) and second.pivotal == first.pivotal
    # another policy id, or another rollout count, does not reuse the estimates
    other = ToyEstimator()
    PivotalTokenSearch(other, toy_logprobs, CONFIG, policy_id="toy-v2", cache=tmp_path).run(qs[:1])
    assert other.calls > 0


def test_interrupted_search_resumes_from_the_cache_without_repeating_rollouts(tmp_path):
    qs = [question(f"q{i}") for i in range(3)]
    config = PTSConfig(rollouts=200, p_gap=0.2, trajectories=2, max_rows=400, seed=7)  # 2 prefixes per call
    whole_est = ToyEstimator()
    whole = PivotalTokenSearch(whole_est, toy_logprobs, config, policy_id="toy").run(qs)

    broken = ToyEstimator(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        PivotalTokenSearch(broken, toy_logprobs, config, policy_id="toy", cache=tmp_path).run(qs)
    assert broken.calls == 4 and 0 < broken.rollouts < whole_est.rollouts
    # a torn last line (killed mid-append) is dropped on load
    with open(tmp_path / "pts-cache.jsonl", "ab") as f:
        f.write(b'{"key": "abc", "kind": "estim')

    resumed_est = ToyEstimator()
    resumed = PivotalTokenSearch(resumed_est, toy_logprobs, config, policy_id="toy", cache=tmp_path).run(qs)
    assert records(resumed) == records(whole) and resumed.pivotal == whole.pivotal
    assert broken.rollouts + resumed_est.rollouts == whole_est.rollouts  # nothing sampled twice
    assert not set(broken.requested) & set(resumed_est.requested)
    assert resumed.report["rollouts_cached"] == broken.rollouts
    assert (tmp_path / "pts-cache.jsonl").read_bytes().endswith(b"\n")


def test_results_do_not_depend_on_batching():
    qs = [question(f"q{i}") for i in range(3)]
    small = PTSConfig(rollouts=200, p_gap=0.2, trajectories=2, max_rows=200, seed=7)
    big = PTSConfig(rollouts=200, p_gap=0.2, trajectories=2, max_rows=100_000, seed=7)
    a = PivotalTokenSearch(ToyEstimator(), toy_logprobs, small, policy_id="toy").run(qs)
    b_est = ToyEstimator()
    b = PivotalTokenSearch(b_est, toy_logprobs, big, policy_id="toy").run(qs)
    assert records(a) == records(b)
    # one call per round: the questions' prefixes share batches
    assert b_est.calls == b.report["rounds"] < a.report["estimator_calls"]


def test_pair_records_are_readable_json():
    result = PivotalTokenSearch(ToyEstimator(), toy_logprobs, CONFIG, policy_id="toy").run([question("q1")])
    lines = [json.loads(json.dumps(p.record(lambda ids: " ".join(f"<{i}>" for i in ids)))) for p in result.pairs]
    assert len(lines) == len(result.pairs) == 2
    for rec in lines:
        assert rec["chosen_ids"] == [A] and rec["rejected_ids"] == [B] and rec["chosen_text"] == f"<{A}>"
        assert rec["prompt_ids"] == [1, 2, 3, 2, *rec["prefix_ids"]] and rec["question_id"] == "q1"
        assert set(rec) >= {"p_before", "p_after", "prefix_text", "alternative_rollouts", "p_alternative"}


def test_cache_rejects_a_corrupt_middle_line(tmp_path):
    (tmp_path / "pts-cache.jsonl").write_bytes(b"not json\n")
    from phi4_engine.errors import DataError

    with pytest.raises(DataError, match="pts-cache.jsonl:1"):
        PTSCache(tmp_path)


# -- the real batched estimator on a tiny torchtitan model -------------------------------------


class ParityVerifier:
    """Accepts a completion whose text has an even length: ~1/2 of random text, deterministic."""

    name, version = "parity", "1"

    def verify_many(self, items):
        return [len(text) % 2 == 0 for _, text in items]


@pytest.fixture(scope="module")
def tiny():
    import torch

    from phi4_engine.titan import phi4
    from phi4_engine.tokenizer import build_phi4_mini

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = build_phi4_mini(256)
    spec = phi4.model_spec("debug", vocab_size=tok.vocab_size, rope_theta=10000.0, max_seq_len=96)
    torch.manual_seed(0)
    model = spec.model.build()
    with torch.no_grad():
        model.init_states()
    yield model.eval(), tok
    torch.set_num_threads(threads)


def test_real_estimator_runs_end_to_end_and_is_deterministic(tiny, tmp_path):
    import torch

    from phi4_engine.titan.generate import Generator
    from phi4_engine.titan.rollouts import ModelEstimator, ModelLogProbs, RolloutSampler, build_search

    model, tok = tiny
    qs = [Question.from_chat(f"q{i}", [{"role": "user", "content": text}], {}, tok)
          for i, text in enumerate(["Compute 2 + 3.", "Compute (12 + 7) × 3.", "Mia has 4 eggs."])]  # fmt: skip
    config = PTSConfig(rollouts=8, p_gap=0.25, max_new_tokens=8, trajectories=2, max_rows=32, seed=3)
    runs = [build_search(model, tok, ParityVerifier(), config, policy_id="tiny").run(qs) for _ in range(2)]
    assert records(runs[0]) == records(runs[1]) and runs[0].report == runs[1].report
    rep = runs[0].report
    assert rep["estimates_fresh"] > len(qs) and rep["rollouts"] == rep["estimates_fresh"] * 8

    cached = build_search(model, tok, ParityVerifier(), config, policy_id="tiny", cache_dir=tmp_path)
    cached.run(qs)
    again = build_search(model, tok, ParityVerifier(), config, policy_id="tiny", cache_dir=tmp_path).run(qs)
    assert again.report["rollouts"] == 0 and records(again) == records(runs[0])

    # Rollouts do not depend on how rows are batched.
    from phi4_engine.pts import PrefixRequest

    reqs = [PrefixRequest(qs[0], ()), PrefixRequest(qs[1], (300, 301)), PrefixRequest(qs[2], (65,), keep=True)]
    one = ModelEstimator(model, tok, ParityVerifier(), max_rows=3).estimate(reqs, config.sampling)
    many = ModelEstimator(model, tok, ParityVerifier(), max_rows=64).estimate(reqs[::-1], config.sampling)[::-1]
    assert one == many and one[2].completions is not None and one[0].completions is None

    # Greedy rollouts equal the Generator's greedy output (same cached decoding).
    prompts = [list(q.prompt_ids) for q in qs]
    sampler = RolloutSampler(model, stop_ids=set(), pad_id=tok.pad_id, max_rows=4)
    greedy = sampler.sample(prompts, [[1, 2]] * 3, [6, 6, 6], temperature=0.0, top_p=1.0)
    want = Generator(model, eos_ids=set(), pad_id=tok.pad_id).generate(prompts, max_new_tokens=6)
    assert [[c.tokens for c in cs] for cs in greedy] == [[w, w] for w in want]

    # Per-token log-probs equal the model's own forward.
    items = [(q.prompt_ids, (65, 66, 67)[: i + 1]) for i, q in enumerate(qs)]
    got = ModelLogProbs(model, max_tokens=64)(items)
    for (prompt, resp), lp in zip(items, got):
        ids = torch.tensor([[*prompt, *resp]])
        with torch.no_grad():
            full = model(ids)[0].log_softmax(-1)
        want_lp = [full[len(prompt) - 1 + j, t].item() for j, t in enumerate(resp)]
        assert lp == pytest.approx(want_lp, abs=1e-4)


def test_two_level_inverse_cdf_matches_a_full_cumsum():
    import torch

    from phi4_engine.titan.rollouts import sample_from_uniforms

    def reference(logits, u, temperature, top_p):
        probs = torch.softmax(logits / temperature, dim=-1)
        order = None
        if top_p < 1:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        cdf = probs.double().cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
        return (pick if order is None else order.gather(-1, pick)).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    for vocab, temperature, top_p in [(352, 1.0, 1.0), (1000, 0.7, 0.9), (8288, 2.0, 0.5)]:
        logits = torch.randn(64, vocab, generator=g) * 3
        u = torch.rand(64, dtype=torch.float64, generator=g)
        got = sample_from_uniforms(logits, u, temperature=temperature, top_p=top_p)
        assert torch.equal(got, reference(logits, u, temperature, top_p))
    logits = torch.full((4, 1000), -1e9)
    logits[:, 5] = logits[:, 700] = 0.0
    u = torch.tensor([0.0, 0.4999, 0.5001, 1 - 1e-16], dtype=torch.float64)
    assert sample_from_uniforms(logits, u, temperature=1.0, top_p=1.0).tolist() == [5, 5, 700, 700]
    assert sample_from_uniforms(logits, u, temperature=0.0, top_p=1.0).tolist() == [5] * 4
