"""``phi4-engine plan``: the paper-scale picture on paper — per stage tokens, steps, FLOPs, memory
per GPU and days, from the spec alone (nothing is built or run).

The arithmetic, so it can be checked by hand:

* **Parameters** from the flavor's shapes: attention ``d·(d + 2·kv·hd) + d·d``, SwiGLU
  ``3·d·ffn``, two RMSNorms per layer, final norm, embedding and untied output head ``V·d`` each.
* **FLOPs per token** = ``6·N`` (forward + backward of every matmul, N = parameters without the
  input embedding, which is a lookup) ``+ 12·L·d·s`` for attention scores and values over a
  sequence of ``s`` tokens (PaLM, App. B; causal masking is not discounted, as in MFU reports).
  DPO adds a reference forward (``2·N + 4·L·d·s`` per token), once, for the cached log-probs.
* **Memory per GPU** under FSDP2 (``shards`` = data-parallel shard degree) × tensor parallel
  ``tp``, mixed precision as torchtitan runs it: fp32 sharded parameters (4 B), fp32 sharded
  gradients (4 B), AdamW moments (8 B), each ``/ (shards·tp)``; plus two layers gathered in
  bf16 for compute (current + prefetch). Activations per sequence and layer, bf16 with a fused
  (flash) attention kernel that stores no ``s×s`` matrix: ``34·s·d`` bytes without activation
  checkpointing (Korthikanti et al. 2022, Eq. 2 without its attention-matrix term) and ``2·s·d``
  (the layer input) with full checkpointing, plus one layer's ``34·s·d`` being recomputed;
  plus fp32 logits and their gradient, ``8·s·V``; all ``/ tp`` (sequence parallel).
* **Days** = FLOPs / (GPUs · peak · MFU) / 86400.

Stage token counts: LM stages ``steps·batch·seq_len``; DPO stages ``pairs·epochs·2 rows`` of
``min(seq_len, dpo_row_tokens)`` tokens (real rows are rarely full: say what you assume). The
cost of building pairs (rollouts, judging) is not included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class ModelNumbers:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def layer_params(self) -> int:
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        return d * (d + 2 * kv) + d * d + 3 * d * self.ffn_dim + 2 * d

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.dim

    @property
    def total_params(self) -> int:
        return self.n_layers * self.layer_params + self.dim + 2 * self.vocab * self.dim

    @property
    def matmul_params(self) -> int:
        """Parameters that cost FLOPs per token (all but the input embedding lookup)."""
        return self.total_params - self.embedding_params


@dataclass(frozen=True)
class Hardware:
    gpus: int
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    mfu: float = 0.4
    memory_gib: float = 80.0


@dataclass
class StagePlan:
    name: str
    kind: str
    tokens: float | None = None
    steps: int | None = None
    seq_len: int | None = None
    micro_batch: int | None = None
    flops: float | None = None
    days: float | None = None
    memory_gib: dict[str, float] = field(default_factory=dict)
    note: str = ""


def model_numbers(flavor: str, vocab: int) -> ModelNumbers:
    from phi4_engine.titan.phi4 import FLAVORS

    shape = FLAVORS[flavor]
    return ModelNumbers(shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.hidden_dim, vocab)


def flops_per_token(m: ModelNumbers, seq_len: int, *, train: bool = True) -> float:
    """Training (forward + backward) or forward-only FLOPs per token at sequence length ``seq_len``."""
    factor = 3 if train else 1
    return factor * (2 * m.matmul_params + 4 * m.n_layers * m.dim * seq_len)


def memory_per_gpu(m: ModelNumbers, *, shards: int, tp: int, seq_len: int, micro_batch: int,
                   live_reference: bool = False) -> dict[str, float]:
    """Bytes per GPU (see the module docstring), in GiB, by component."""
    split = shards * tp
    n = m.total_params
    out = {
        "weights": 4 * n / split,
        "grads": 4 * n / split,
        "optimizer": 8 * n / split,
        "gathered": 2 * 2 * m.layer_params / tp,
    }
    per_seq_layer = 34 * seq_len * m.dim / tp
    logits = 8 * seq_len * m.vocab / tp
    out["activations_no_ac"] = micro_batch * (m.n_layers * per_seq_layer + logits)
    out["activations_full_ac"] = micro_batch * (m.n_layers * 2 * seq_len * m.dim / tp + per_seq_layer + logits)
    if live_reference:
        out["reference"] = 2 * n / tp  # a bf16 replica (the engine's live reference is unsharded)
    base = out["weights"] + out["grads"] + out["optimizer"] + out["gathered"] + out.get("reference", 0.0)
    out["total_no_ac"] = base + out["activations_no_ac"]
    out["total_full_ac"] = base + out["activations_full_ac"]
    return {k: v / GIB for k, v in out.items()}


def plan_stages(spec: Any, vocab: int, hw: Hardware, *, tp: int = 1, dpo_row_tokens: int = 2048) -> list[StagePlan]:
    """One :class:`StagePlan` per stage of a validated RunSpec."""
    if hw.gpus < 1 or hw.gpus % tp:
        raise ValueError(f"--gpus ({hw.gpus}) must be a positive multiple of the tensor-parallel degree ({tp})")
    m = model_numbers(spec.model.flavor, vocab)
    dp = hw.gpus // tp
    plans = []
    for stage in spec.stages:
        plan = StagePlan(stage.name, stage.kind)
        seq = getattr(stage, "seq_len", None)
        batch = getattr(stage, "batch_size", None)
        if seq is None or batch is None:
            plan.note = "no batch/sequence shape in this stage's spec"
            plans.append(plan)
            continue
        plan.seq_len = seq
        plan.micro_batch = getattr(stage, "micro_batch_size", None) or max(1, math.ceil(batch / dp))
        if hasattr(stage, "total_steps"):  # LM stages
            plan.steps = stage.total_steps
            plan.tokens = float(plan.steps * batch * seq)
            plan.flops = plan.tokens * flops_per_token(m, seq)
            rows = plan.micro_batch
        elif hasattr(stage, "pairs"):  # DPO stages: chosen + rejected rows per pair
            row = min(seq, dpo_row_tokens)
            plan.steps = stage.steps_for(stage.pairs)
            plan.tokens = float(stage.pairs * stage.epochs * 2 * row)
            reference = stage.pairs * 2 * row * flops_per_token(m, row, train=False)
            plan.flops = plan.tokens * flops_per_token(m, row) + reference
            plan.note = f"rows of {row} tokens assumed; pair building not included"
            rows = 2 * plan.micro_batch
        else:
            plans.append(plan)
            continue
        plan.days = plan.flops / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu) / 86400
        plan.memory_gib = memory_per_gpu(m, shards=dp, tp=tp, seq_len=seq, micro_batch=rows,
                                         live_reference=getattr(stage, "reference", "cached") == "live")
        plans.append(plan)
    return plans


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("Y", 1e24), ("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(plans: list[StagePlan], m: ModelNumbers, hw: Hardware, tp: int) -> str:
    lines = [
        f"model: {m.total_params:,} parameters ({m.n_layers} layers, d={m.dim}, ffn={m.ffn_dim}, vocab={m.vocab})",
        f"hardware: {hw.gpus} GPUs x {hw.peak_tflops:g} TFLOP/s peak at MFU {hw.mfu:.0%}, {hw.memory_gib:g} GiB each; "
        f"FSDP2 over {hw.gpus // tp} x TP {tp}",
        "",
        f"{'stage':<12} {'tokens':>8} {'steps':>9} {'seq':>6} {'mb/gpu':>6} {'FLOPs':>9} {'days':>8}  "
        f"{'mem no-AC':>10} {'mem full-AC':>11}  note",
    ]
    total_days = 0.0
    for p in plans:
        mem = p.memory_gib
        fit = lambda key: "-" if key not in mem else f"{mem[key]:.1f}G" + ("!" if mem[key] > hw.memory_gib else "")  # noqa: E731
        lines.append(
            f"{p.name:<12} {_si(p.tokens):>8} {p.steps if p.steps is not None else '-':>9} {p.seq_len or '-':>6} "
            f"{p.micro_batch or '-':>6} {_si(p.flops):>9} {'-' if p.days is None else f'{p.days:.2f}':>8}  "
            f"{fit('total_no_ac'):>10} {fit('total_full_ac'):>11}  {p.note}"
        )
        total_days += p.days or 0.0
    lines.append(f"{'total':<12} {'':>8} {'':>9} {'':>6} {'':>6} {_si(sum(p.flops or 0 for p in plans)):>9} {total_days:>8.2f}")
    lines.append("memory: GiB per GPU (weights + grads + AdamW + gathered layers + activations); '!' = over the GPU's memory")
    return "\n".join(lines)
