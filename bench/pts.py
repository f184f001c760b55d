"""Pivotal Token Search rollouts: the batched search vs one-at-a-time sampling, same model, same run.

A randomly initialised Phi-4 `tiny` model (phi4-mini vocabulary, 8288 ids) searches the
embedded arithmetic questions (chat prompts). A random model never gets a math answer right,
so every question would fall outside the 0.2-0.8 window; the oracle here is a stand-in that
accepts a completion whose text has an even length (about half of random text), so the
search really subdivides. Generation dominates either way; the verifier is trivial on both sides.

* ours: ``PivotalTokenSearch`` with ``ModelEstimator`` (all questions together; each round's
  prefixes sampled ``max_rows`` rollouts at a time through the KV cache, one prefill per prefix),
  timed end to end (log-probs and verification included): rollouts / s.
* one-at-a-time: a sample of the prefixes the search evaluated, each rollout generated alone
  (``Generator.generate_completions`` on one row, same temperature, same length budget) and
  verified alone.
* per-prefix batch (for reference): the same sample, one ``generate_completions`` call per
  prefix with its ``rollouts`` rows (the minimal batching).

    python bench/pts.py [--quick] [--threads N]

Last line: {"bench": "pts", "ours": rollouts/s, "baseline": rollouts/s (one at a time), "unit": "rollouts/s",
"ratio": ours/baseline, ...} (target ratio >= 4). Timings are noisy on a shared machine: the
1-minute load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from phi4_engine.plugins.synthetic_arithmetic import generate as arithmetic  # noqa: E402
from phi4_engine.pts import PivotalTokenSearch, PTSConfig, Question, rollout_keys  # noqa: E402
from phi4_engine.titan import phi4  # noqa: E402
from phi4_engine.titan.generate import Generator  # noqa: E402
from phi4_engine.titan.rollouts import ModelEstimator, ModelLogProbs  # noqa: E402
from phi4_engine.tokenizer import build_phi4_mini  # noqa: E402


class EvenLength:
    """Stand-in oracle: accepts text of even length (see the module docstring)."""

    name, version = "even-length", "1"

    def verify_many(self, items):
        return [len(text) % 2 == 0 for _, text in items]


class Recording:
    """Passes calls to the estimator and remembers the prefixes asked for."""

    def __init__(self, inner):
        self.inner, self.verifier_id, self.requests = inner, inner.verifier_id, []

    def estimate(self, requests, params):
        self.requests += list(requests)
        return self.inner.estimate(requests, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 questions, 16 rollouts, 16 new tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_questions, rollouts, new_tokens, sample = (8, 16, 16, 2) if args.quick else (24, 32, 32, 3)
    config = PTSConfig(rollouts=rollouts, p_gap=0.25, max_new_tokens=new_tokens, trajectories=1,
                       max_rows=256, seed=0, temperature=1.0)  # fmt: skip

    tok = build_phi4_mini()
    torch.manual_seed(0)
    model = phi4.model_spec("tiny", vocab_size=tok.vocab_size, rope_theta=10000.0, max_seq_len=256).model.build()
    with torch.no_grad():
        model.init_states()
    model.eval()
    questions = []
    for i in range(n_questions):
        s = arithmetic(random.Random(i))
        questions.append(Question.from_chat(f"arith-{i}", [{"role": "user", "content": s.prompt}], s.meta, tok))
    verifier = EvenLength()
    stop = {tok.im_end_id, tok.eos_id}
    generator = Generator(model, eos_ids=stop, pad_id=tok.pad_id)
    generator.generate([list(questions[0].prompt_ids)], max_new_tokens=4)  # warm-up

    # ours: the whole batched search
    estimator = Recording(ModelEstimator(model, tok, verifier, max_rows=config.max_rows))
    search = PivotalTokenSearch(estimator, ModelLogProbs(model), config, policy_id="bench")
    start = time.perf_counter()
    result = search.run(questions)
    ours_s = time.perf_counter() - start
    rep = result.report
    ours = rep["rollouts"] / ours_s

    # baselines on an evenly spaced sample of the same prefixes
    reqs = estimator.requests
    picked = [reqs[round(i * (len(reqs) - 1) / max(sample - 1, 1))] for i in range(min(sample, len(reqs)))]

    def budget(req):
        return max(config.max_new_tokens - len(req.prefix), 0)

    start = time.perf_counter()
    n_single = 0
    for req in picked:
        prompt = [*req.question.prompt_ids, *req.prefix]
        for key in rollout_keys(config.seed, req.question.prompt_ids, req.prefix, rollouts):
            comp = generator.generate_completions([prompt], max_new_tokens=budget(req), temperature=config.temperature,
                                                  seed=key & ((1 << 63) - 1))[0]  # fmt: skip
            verifier.verify_many([(req.question.meta, tok.decode([*req.prefix, *comp.tokens]))])
            n_single += 1
    single_s = time.perf_counter() - start
    single = n_single / single_s

    start = time.perf_counter()
    for req in picked:
        prompt = [*req.question.prompt_ids, *req.prefix]
        comps = generator.generate_completions([prompt] * rollouts, max_new_tokens=budget(req),
                                               temperature=config.temperature, seed=config.seed)  # fmt: skip
        verifier.verify_many([(req.question.meta, tok.decode([*req.prefix, *c.tokens])) for c in comps])
    per_prefix_s = time.perf_counter() - start
    per_prefix = n_single / per_prefix_s

    load = os.getloadavg()[0]
    print(f"tiny flavor, vocab {tok.vocab_size}, {n_questions} questions, {rollouts} rollouts per prefix, "
          f"max_new_tokens {new_tokens}; torch threads = {torch.get_num_threads()}; load average {load:.2f}")
    print(f"search: {rep['searched']} searched, {rep['estimates']} prefixes in {rep['rounds']} rounds, "
          f"{rep['estimator_calls']} estimator calls, {rep['pivotal_tokens']} pivotal tokens, {rep['pairs']} pairs")
    print(f"{'side':<34}{'rollouts':>10}{'seconds':>10}{'rollouts/s':>12}")
    print(f"{'batched search (ours)':<34}{rep['rollouts']:>10}{ours_s:>10.2f}{ours:>12.1f}")
    print(f"{'one rollout at a time':<34}{n_single:>10}{single_s:>10.2f}{single:>12.1f}")
    print(f"{'one prefix at a time (batch=rollouts)':<34}{n_single:>10}{per_prefix_s:>10.2f}{per_prefix:>12.1f}")
    print(f"ratio ours / one-at-a-time = {ours / single:.2f} (target >= 4); ours / per-prefix = {ours / per_prefix:.2f}")
    print(json.dumps({"bench": "pts", "ours": round(ours, 2), "baseline": round(single, 2), "unit": "rollouts/s",
                      "ratio": round(ours / single, 3), "per_prefix_batch": round(per_prefix, 2),
                      "ratio_vs_per_prefix": round(ours / per_prefix, 3), "load1": round(load, 2)}))


if __name__ == "__main__":
    main()
