"""Tokens/s and MFU of a Phi-4-shaped model: the engine versus torchtitan's own trainer.

Both sides train the same model (``--flavor``; on one H100/H200 the largest Phi-4 shape that
fits is a reduced-depth 14B, ``--layers``), the same batch and sequence length, the same
parallelism options (bf16 on CUDA, ``--float8``, activation checkpointing) in this process:

* ours: ``Engine.run`` of a one-stage pretrain spec (data mixture, hooks, logging, the
  engine's Trainer subclass with its non-finite guard and batch digests; checkpoints off);
* baseline: torchtitan's stock ``Trainer`` built from the very same ``Trainer.Config`` the
  engine derives (``phi4_engine.titan.trainer.stock_trainer_step_times``), fed by the engine's
  own loader on the same source (same packed documents, same attention masks).

MFU = (6·N + attention) FLOPs per token (``phi4_engine.plan``) × tokens/s ÷ peak FLOP/s
(``--peak-tflops``; default 989 for an H100/H200 in bf16, none on CPU).

    python bench/mfu.py --quick                              # CPU: debug model, the ratio only
    python bench/mfu.py --flavor 14b --layers 8 --seq 4096   # one H100/H200, bf16
    python bench/mfu.py --flavor 14b --layers 8 --seq 4096 --float8

Last line: {"bench": "mfu", "ours": tok/s, "baseline": tok/s, "unit": "tokens/s", "ratio": ours/baseline, "mfu": ...}
(target: ratio >= 0.97; MFU >= 40% in bf16 on an H100).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.step_clock import StepClock  # noqa: E402
from phi4_engine.engine import Engine  # noqa: E402
from phi4_engine.plan import flops_per_token, model_numbers  # noqa: E402


def spec(args: argparse.Namespace) -> dict:
    parallelism = {"kind": "auto", "activation_checkpointing": args.ac}
    if args.float8:
        parallelism["float8"] = {"recipe": "rowwise", "emulate": not torch.cuda.is_available()}
    return {
        "name": "bench-mfu",
        "model": {"flavor": args.flavor},
        "tokenizer": {"kind": "phi4" if args.flavor == "14b" else "phi4-mini"},
        "parallelism": parallelism,
        "checkpoint": {"interval": 10**9, "keep_latest_k": 0},
        "logging": {"progress": False, "tensorboard": False},
        "stages": [{
            "kind": "pretrain", "steps": args.steps, "seq_len": args.seq, "batch_size": args.batch, "lr": 1e-4,
            "scheduler": {"kind": "constant"},
            "data": {"sources": [{"kind": "synthetic-prose", "num_documents": 2000}]},
        }],
    }  # fmt: skip


def with_layers(flavor: str, layers: int | None):
    """Shrink a flavor's depth (same width, heads, FFN) so a 14B-shaped model fits one GPU."""
    from phi4_engine.titan import phi4

    if layers:
        phi4.FLAVORS[flavor] = dataclasses.replace(phi4.FLAVORS[flavor], n_layers=layers)


def ours(args: argparse.Namespace) -> list[float]:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        Engine(spec(args), plugins=[clock], run_dir=Path(tmp) / "run").run()
    return clock.step_times(args.warmup)


def baseline(args: argparse.Namespace) -> list[float]:
    from phi4_engine.titan.trainer import LMJob, stock_trainer_step_times

    engine = Engine(spec(args))
    run = engine.validate()
    tokenizer = engine.registry.build("tokenizer", run.tokenizer)
    vocab = tokenizer.vocab_size

    from phi4_engine.data.mixture import MixtureLoader
    from phi4_engine.data.source import SourceContext

    stage = run.stages[0]
    source = engine.registry.build("data_source", stage.data.sources[0], SourceContext(base_dir=".", seed=0))

    def same_data(dp_rank, dp_world, seq_len, batch):  # the engine's loader on the same source
        return MixtureLoader([(source, 1.0)], tokenizer, seq_len=seq_len, batch_size=batch, dp_rank=dp_rank,
                             dp_world_size=dp_world)  # fmt: skip

    layout = engine.registry.build("parallelism", run.parallelism)
    with tempfile.TemporaryDirectory() as tmp:
        job = LMJob(dump_folder=tmp, flavor=args.flavor, vocab_size=vocab, rope_theta=10_000.0, seq_len=args.seq,
                    steps=args.steps, batch_size=args.batch, global_batch_size=args.batch, lr=1e-4,
                    make_loader=same_data, tokenizer=tokenizer, layout=layout, decay_type="none",
                    checkpoint_interval=10**9)  # fmt: skip
        return stock_trainer_step_times(job, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--layers", type=int, default=None, help="override the flavor's depth")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--float8", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0 if torch.cuda.is_available() else None)
    parser.add_argument("--quick", action="store_true", help="debug model, 15 steps")
    args = parser.parse_args()
    if args.quick:
        args.flavor, args.steps, args.warmup = "debug", 15, 3
    os.environ.setdefault("PHI4_ENGINE_PROGRESS", "0")
    with_layers(args.flavor, args.layers)
    # Alternate the two sides so drift in machine load hits both alike; keep each side's best.
    runs = {"ours": [], "baseline": []}
    for _ in range(1 if args.quick else 2):
        runs["ours"].append(statistics.median(ours(args)))
        runs["baseline"].append(statistics.median(baseline(args)))
    tokens = args.batch * args.seq
    ours_tps, base_tps = tokens / min(runs["ours"]), tokens / min(runs["baseline"])
    vocab = Engine(spec(args)).registry.build("tokenizer", Engine(spec(args)).validate().tokenizer).vocab_size
    flops = flops_per_token(model_numbers(args.flavor, vocab), args.seq)
    mfu = (lambda tps: round(tps * flops / (args.peak_tflops * 1e12), 4)) if args.peak_tflops else (lambda tps: None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.flavor} (layers {args.layers or 'as the flavor'}), seq {args.seq}, batch {args.batch}, "
          f"float8 {args.float8}, AC {args.ac}, {device}")  # fmt: skip
    print(f"{'side':<26}{'tokens/s':>12}{'MFU':>8}")
    for name, tps in (("engine", ours_tps), ("torchtitan stock Trainer", base_tps)):
        print(f"{name:<26}{tps:>12.0f}{(f'{mfu(tps):.1%}' if mfu(tps) is not None else '-'):>8}")
    print(f"ratio engine/torchtitan = {ours_tps / base_tps:.3f} (target >= 0.97)")
    print(json.dumps({"bench": "mfu", "ours": round(ours_tps, 1), "baseline": round(base_tps, 1), "unit": "tokens/s",
                      "ratio": round(ours_tps / base_tps, 4), "mfu": mfu(ours_tps), "baseline_mfu": mfu(base_tps)}))  # fmt: skip


if __name__ == "__main__":
    main()
