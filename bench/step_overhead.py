"""Step overhead: one pretrain step through the engine vs a bare torch training loop.

Both sides train the same Phi-4 `tiny` model (phi4-mini vocabulary) on batches of the same shape
in this process: the engine through Engine.run (torchtitan Trainer, data mixture, hooks,
TensorBoard and JSONL logging), the baseline as the shortest honest loop — forward,
cross-entropy, backward, grad clipping, AdamW, LR schedule — on one fixed batch. Step times are
the median of the steady-state steps (the first few warm-up steps are dropped).

    python bench/step_overhead.py [--quick]

Last line: {"bench": "step_overhead", "ours": s/step, "baseline": s/step, "unit": "s/step", "ratio": ours/baseline}
(target ratio <= 1.10 on CPU).
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

import torch  # noqa: E402

from bench.step_clock import StepClock  # noqa: E402
from phi4_engine.engine import Engine  # noqa: E402

SEQ, BATCH, LR, WARMUP = 256, 8, 3e-3, 5


def spec(steps: int) -> dict:
    return {
        "name": "bench-step",
        "model": {"flavor": "tiny"},
        "tokenizer": {"kind": "phi4-mini"},
        "checkpoint": {"interval": 100000, "keep_latest_k": 2},
        "logging": {"progress": False},
        "stages": [
            {
                "kind": "pretrain",
                "steps": steps,
                "seq_len": SEQ,
                "batch_size": BATCH,
                "lr": LR,
                "scheduler": {"kind": "warmup-cosine", "warmup_steps": WARMUP},
                "data": {"sources": [
                    {"kind": "synthetic-prose", "weight": 0.5},
                    {"kind": "synthetic-arithmetic", "weight": 0.5},
                ]},
            }
        ],
    }


def engine_step_time(steps: int, skip: int) -> float:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        Engine(spec(steps), plugins=[clock], run_dir=Path(tmp) / "run").run()
    return statistics.median(clock.step_times(skip))


def bare_step_time(steps: int, skip: int) -> float:
    from phi4_engine.titan.phi4 import model_spec

    engine = Engine(spec(steps))
    tokenizer = engine.registry.build("tokenizer", engine.validate().tokenizer)
    torch.manual_seed(0)
    model = model_spec("tiny", vocab_size=tokenizer.vocab_size, rope_theta=10000.0, max_seq_len=SEQ).model.build()
    with torch.no_grad():
        model.init_weights()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    tokens = torch.randint(0, tokenizer.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    times = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        loss.item()  # the engine reads the loss every step too
        times.append(time.perf_counter())
    deltas = [b - a for a, b in zip(times, times[1:])][skip:]
    return statistics.median(deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    os.environ.setdefault("PHI4_ENGINE_PROGRESS", "0")
    steps, skip = (25, 5) if args.quick else (80, 10)
    # Alternate the two sides so drift in machine load hits both alike.
    ours, base = [], []
    for _ in range(1 if args.quick else 2):
        ours.append(engine_step_time(steps, skip))
        base.append(bare_step_time(steps, skip))
    ours_s, base_s = min(ours), min(base)
    print(f"{'side':<22}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'engine (torchtitan)':<22}{ours_s:>10.4f}{BATCH * SEQ / ours_s:>12.0f}")
    print(f"{'bare torch loop':<22}{base_s:>10.4f}{BATCH * SEQ / base_s:>12.0f}")
    print(f"ratio engine/bare = {ours_s / base_s:.3f} (target <= 1.10); torch threads = {torch.get_num_threads()}")
    print(json.dumps({"bench": "step_overhead", "ours": round(ours_s, 5), "baseline": round(base_s, 5), "unit": "s/step", "ratio": round(ours_s / base_s, 4)}))


if __name__ == "__main__":
    main()
