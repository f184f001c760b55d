"""DPO training throughput: the engine's DPO trainer vs TRL's DPOTrainer, same shapes, same pairs.

Both sides train the same model shapes in fp32 on CPU: ours is the Phi-4 ``tiny`` flavor
(hidden 192, FFN 704, 4 layers, 8 heads, 2 KV heads, RMSNorm, SwiGLU, untied, no bias) with the
phi4-mini vocabulary (8288 ids) through ``run_dpo`` (torchtitan trainer, cached reference
log-probs); the baseline is HF ``LlamaForCausalLM`` with equal hidden/intermediate/heads/KV
heads/layers/vocab (``--hf-model phi3``: ``Phi3ForCausalLM``, fused qkv/gate_up) through
``trl.DPOTrainer`` at its fastest documented settings for this case: ``precompute_ref_log_probs``,
no eval, no logging, no checkpoints, no gradient checkpointing, fp32, sequential sampler (so both
sides see the same batches). ``padding_free=True`` is not used: TRL 1.16 says it is temporarily
unavailable (it warns and pads anyway) and needs FlashAttention; TRL pads each batch to its
longest row. Same sigmoid loss, beta 0.1, batch size, optimizer (AdamW), grad clip 1.0, threads.

Workloads (random token ids, seeded, identical for both sides):
  judge    whole responses: prompt 40-80 tokens, chosen and rejected 30-120 tokens each
  pivotal  PTS pairs: a shared prefix (prompt + partial response) of 200-400 tokens, then ONE
           differing token

Timing: training steps only. Each side runs in its own subprocess; the reference log-probs are
precomputed before training on both sides and excluded, as are model build, data preparation
and ``--warmup`` steps; pairs/s = measured steps x batch / wall time between the step-end
callbacks. Rounds alternate which side runs first; a side's figure is its best round. Peak
memory is the subprocess's peak RSS (``ru_maxrss``: imports, model, optimizer, precompute and
training together).

    python bench/dpo_step.py [--quick] [--threads N] [--rounds R] [--hf-model llama|phi3]

Needs TRL (benchmark only): ``.venv/bin/pip install -c constraints.txt trl`` (or the ``bench``
extra with the same constraints). Last line:
{"bench": "dpo_step", "ours": pairs/s, "baseline": pairs/s, "unit": "pairs/s", "ratio": min of the
two workloads' ours/baseline} (target >= 1.5 on each workload).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAVOR, ROPE_THETA, BETA, LR = "tiny", 10000.0, 0.1, 1e-6
WORKLOADS = ("judge", "pivotal")


def make_pairs(workload: str, n: int, vocab_ranks: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt, chosen, rejected)`` token ids; both sides read exactly these."""
    rng = random.Random(f"{workload}:{seed}")

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(vocab_ranks) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for _ in range(n):
        if workload == "judge":
            pairs.append((ids(40, 80), ids(30, 120), ids(30, 120)))
        else:
            chosen = rng.randrange(vocab_ranks)
            rejected = (chosen + 1 + rng.randrange(vocab_ranks - 1)) % vocab_ranks
            pairs.append((ids(200, 400), [chosen], [rejected]))
    return pairs


# -- workers (one subprocess per side and workload) -------------------------------------------


def _engine(pairs, args, vocab, pad_id, seq_len, workdir) -> list[float]:
    import torch

    from phi4_engine.titan import dpo, phi4
    from phi4_engine.titan.generate import save_weights
    from phi4_engine.titan.dpo import DPOJob, PreferencePair, compute_reference_logps, pairs_loader, run_dpo

    if args.ours_layout == "plain":  # ablation: every batch scored as the loader pads it, full logits
        dpo.is_plain_positions = lambda *_: False
    torch.manual_seed(0)
    model = phi4.model_spec(FLAVOR, vocab_size=vocab, rope_theta=ROPE_THETA, max_seq_len=seq_len).model.build()
    with torch.no_grad():
        model.init_states()
    init = os.path.join(workdir, "init", "step-0")
    save_weights(model.state_dict(), init)
    del model
    prefs = [PreferencePair(p, c, r) for p, c, r in pairs]
    refs = compute_reference_logps(
        init, prefs, flavor=FLAVOR, vocab_size=vocab, rope_theta=ROPE_THETA, seq_len=seq_len, pad_id=pad_id,
        batch_size=args.batch,
    )  # fmt: skip
    stamps: list[float] = []
    job = DPOJob(
        dump_folder=os.path.join(workdir, "run"), flavor=FLAVOR, vocab_size=vocab, rope_theta=ROPE_THETA,
        seq_len=seq_len, steps=args.warmup + args.steps, batch_size=args.batch, lr=LR, beta=BETA,
        checkpoint_interval=10**9, decay_type="none", min_lr_factor=1.0, max_norm=1.0,
        make_loader=pairs_loader(prefs, pad_id=pad_id, ref_logps=refs, shuffle=False),
        init_weights_from=init, reference="cached", on_step=lambda step, m: stamps.append(time.perf_counter()),
    )  # fmt: skip
    run_dpo(job)
    return stamps


def _trl(pairs, args, vocab, pad_id, eos_id, seq_len, workdir) -> list[float]:
    import logging
    import warnings

    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from phi4_engine.titan import phi4

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    shape = phi4.FLAVORS[FLAVOR]
    common = dict(
        vocab_size=vocab, hidden_size=shape.dim, intermediate_size=shape.hidden_dim, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, max_position_embeddings=seq_len,
        rms_norm_eps=shape.norm_eps, tie_word_embeddings=False, pad_token_id=pad_id, eos_token_id=eos_id,
        bos_token_id=eos_id, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(0)
    if args.hf_model == "phi3":
        config = transformers.Phi3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        model = transformers.Phi3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(
            **common, attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    # A word-level tokenizer over the same ids: TRL only reads its pad/eos ids (the data is tokenized).
    word = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token=f"t{pad_id}"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}")
    data = Dataset.from_dict(
        {"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
         "rejected_ids": [r for _, _, r in pairs]}
    )  # fmt: skip

    class PretokenizedDPOTrainer(DPOTrainer):
        """The pairs are token ids already: skip TRL's text tokenization (and its added EOS)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    config = DPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.batch, max_length=None, padding_free=False, gradient_checkpointing=False,
        bf16=False, fp16=False, use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(Stamp())
    trainer.train()
    return stamps


def worker(args) -> None:
    import torch

    from phi4_engine.tokenizer import build_phi4_mini

    torch.set_num_threads(args.threads)
    tokenizer = build_phi4_mini()
    n = (args.warmup + args.steps) * args.batch
    pairs = make_pairs(args.workload, n, tokenizer.vocab_ranks)
    seq_len = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    with tempfile.TemporaryDirectory(prefix="dpo_step_") as workdir:
        if args.side == "ours":
            stamps = _engine(pairs, args, tokenizer.vocab_size, tokenizer.pad_id, seq_len, workdir)
        else:
            stamps = _trl(pairs, args, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id, seq_len, workdir)
    if len(stamps) != args.warmup + args.steps:
        raise SystemExit(f"expected {args.warmup + args.steps} step callbacks, got {len(stamps)}")
    seconds = stamps[-1] - stamps[args.warmup - 1]
    print(json.dumps({
        "pairs_per_s": args.steps * args.batch / seconds, "seconds": seconds, "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


# -- the driver -------------------------------------------------------------------------------


def run_side(side: str, workload: str, args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--side", side, "--workload", workload, "--threads", str(args.threads),
        "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--hf-model", args.hf_model, "--ours-layout", args.ours_layout,
    ]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1",
    )  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{side} / {workload} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 1 + 3 steps instead of 2 rounds of 2 + 6")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads, both sides (default 1: on a shared 2-core machine 2 threads time the contention)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps per run")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (best round counts)")
    parser.add_argument("--hf-model", choices=("llama", "phi3"), default="llama", help="the TRL side's HF class")
    parser.add_argument(
        "--ours-layout", choices=("auto", "plain"), default="auto",
        help="plain: the engine without its fast DPO layouts (rows padded to seq_len, full logits), an ablation",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed (benchmark-only dependency): .venv/bin/pip install -c constraints.txt trl")
        sys.exit(1)
    args.steps = args.steps or (3 if args.quick else 6)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 2)
    import trl
    import transformers

    load_before = os.getloadavg()
    results: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for workload in WORKLOADS:
            order = ("ours", "trl") if round_ % 2 == 0 else ("trl", "ours")
            for side in order:
                result = run_side(side, workload, args)
                results.setdefault((side, workload), []).append(result)
                print(f"  round {round_ + 1} {workload:<8} {side:<5} {result['pairs_per_s']:7.2f} pairs/s", flush=True)
    load_after = os.getloadavg()

    def best(side: str, workload: str) -> dict:
        return max(results[(side, workload)], key=lambda r: r["pairs_per_s"])

    print(f"\nDPO step throughput, Phi-4 '{FLAVOR}' shapes, vocab 8288, fp32, batch {args.batch} pairs, "
          f"{args.steps} measured steps after {args.warmup} warm-up, best of {args.rounds} alternating round(s); "
          f"threads {args.threads}; engine layouts {args.ours_layout}; TRL {trl.__version__}, transformers {transformers.__version__} "
          f"(HF {args.hf_model}); reference log-probs precomputed and excluded on both sides")
    print(f"{'workload':<10}{'side':<8}{'pairs/s':>10}{'runs (pairs/s)':>24}{'peak RSS MB':>14}")
    ratios = {}
    for workload in WORKLOADS:
        for side in ("ours", "trl"):
            runs = " ".join(f"{r['pairs_per_s']:.2f}" for r in results[(side, workload)])
            b = best(side, workload)
            print(f"{workload:<10}{side:<8}{b['pairs_per_s']:>10.2f}{runs:>24}{b['peak_rss_mb']:>14.0f}")
        ratios[workload] = best("ours", workload)["pairs_per_s"] / best("trl", workload)["pairs_per_s"]
    print("ratios ours/TRL: " + ", ".join(f"{w} {r:.2f}" for w, r in ratios.items()) + " (target >= 1.5 each)")
    print(f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    worst = min(ratios, key=ratios.get)
    print(json.dumps({
        "bench": "dpo_step", "ours": round(best("ours", worst)["pairs_per_s"], 2),
        "baseline": round(best("trl", worst)["pairs_per_s"], 2), "unit": "pairs/s", "ratio": round(ratios[worst], 3),
        "workload": worst, "ratios": {w: round(r, 3) for w, r in ratios.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
