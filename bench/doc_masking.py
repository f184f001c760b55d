"""Document masking: train-step time with block-causal masks vs plain causal SDPA (CPU, fp32).

Same Phi-4 `tiny` model (phi4-mini vocabulary, 8288), same packed batch, in this process:
"ours" = the `sdpa` backend given per-document positions (mask built each step from positions,
then SDPA with an explicit [B, 1, L, L] boolean mask), "baseline" = the same module with no
masks (SDPA is_causal). A step = mask build + forward + cross-entropy + backward + AdamW. The
two variants alternate step by step (fair under a noisy, shared CPU); medians are reported.
Documents are 8..L/2 tokens long, so every row holds several.

    python bench/doc_masking.py [--quick] [--threads N]

Last line: {"bench": "doc_masking", "ours": s/step, "baseline": s/step, "unit": "s/step", "ratio": ours/baseline}
for the first shape (seq 256, batch 8); the table also shows seq 1024, batch 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from phi4_engine.data.positions import document_positions  # noqa: E402
from phi4_engine.titan import attention, phi4  # noqa: E402

VOCAB = 8192 + 96  # phi4-mini: 8192 cl100k ranks + 96 specials
EOS = 8192 + 1  # <|endoftext|> (specials follow the ranks, FACTS.md §2)
SHAPES = [(256, 8), (1024, 2)]


def packed_batch(seq: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq + 1:
            length = int(torch.randint(8, seq // 2, (1,), generator=generator))
            row += torch.randint(0, 8192, (length,), generator=generator).tolist() + [EOS]
        rows.append(row[: seq + 1])
    return torch.tensor(rows)


def measure(seq: int, batch: int, steps: int, skip: int) -> dict[str, float]:
    config = phi4.build_model_config(
        phi4.FLAVORS["tiny"], vocab_size=VOCAB, rope_theta=250000.0, max_seq_len=seq
    )
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = packed_batch(seq, batch, torch.Generator().manual_seed(0))
    inputs, labels = rows[:, :-1], rows[:, 1:]
    positions = document_positions(inputs, EOS)

    def step(masked: bool) -> float:
        start = time.perf_counter()
        kwargs = {}
        if masked:
            batch_dict = attention.prepare_attention_inputs(config, {"input": inputs, "positions": positions})
            kwargs = {k: v for k, v in batch_dict.items() if k != "input"}
            assert kwargs["attention_masks"] is not None
        logits = model(inputs, **kwargs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(steps):
        for masked in ((True, False) if i % 2 else (False, True)):
            t = step(masked)
            if i >= skip:
                times[masked].append(t)
    mask_start = time.perf_counter()
    for _ in range(20):
        attention.block_causal_mask(positions)
    return {
        "masked": statistics.median(times[True]),
        "causal": statistics.median(times[False]),
        "mask_build": (time.perf_counter() - mask_start) / 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        # On a shared 2-core host, 1 thread avoids OpenMP spin-waits that distort small ops.
        torch.set_num_threads(args.threads)
    steps, skip = (8, 2) if args.quick else (30, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny flavor, vocab {VOCAB}")
    print(f"{'seq':>5} {'batch':>5} {'causal s/step':>14} {'masked s/step':>14} {'ratio':>6} {'mask build ms':>14}")
    results = []
    for seq, batch in SHAPES:
        r = measure(seq, batch, steps, skip)
        results.append(r)
        print(
            f"{seq:>5} {batch:>5} {r['causal']:>14.4f} {r['masked']:>14.4f} "
            f"{r['masked'] / r['causal']:>6.3f} {1000 * r['mask_build']:>14.2f}"
        )
    first = results[0]
    print(json.dumps({
        "bench": "doc_masking", "ours": round(first["masked"], 5), "baseline": round(first["causal"], 5),
        "unit": "s/step", "ratio": round(first["masked"] / first["causal"], 4),
    }))


if __name__ == "__main__":
    main()
