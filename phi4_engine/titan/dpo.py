"""Direct preference optimization on torchtitan: losses, sequence log-probs, a paired trainer.

Pieces, from the inside out:

* ``dpo_sigmoid_loss`` / ``ipo_loss``: the losses over per-pair log-probs. Both use the log-ratio
  difference ``h = (pc - rc) - (pr - rr)`` (policy/reference, chosen/rejected). Sigmoid DPO is
  ``mean(-logsigmoid(beta * h))`` over SUMMED response log-probs; IPO is ``mean((h - 1/(2 beta))^2)``
  and, as in the IPO paper and TRL's ``loss_type="ipo"``, takes per-token AVERAGED log-probs
  (sum / number of scored tokens): the trainer divides by the counts for ``ipo`` only.
* ``sequence_logps``: ``sum_t mask[t] * log p(ids[t] | ids[<t])`` per row, with a TOKEN-level mask
  (a dpo-pivotal pair differing in one token scores just that token; refusal DPO its first 5).
* ``PreferencePair`` / ``encode_pairs`` / ``pairs_loader``: the batch layout, ``(input_dict,
  labels)`` with ``input`` ``[2B, L]`` = the B chosen rows FIRST, then the B rejected rows in the
  same pair order; ``loss_mask`` ``[2B, L]``; ``positions`` ``[2B, L]``; in cached mode
  ``ref_logp`` ``[2B]`` (SUMS, same row order). Rows are prompt + response, right-padded.
  ``labels`` are LM-style shifted targets with ``IGNORE_INDEX`` off the mask, so torchtitan's
  valid-token count is the number of scored tokens.
* ``Phi4DPOTrainer``: overrides ``forward_backward_step`` (policy log-probs, reference log-probs
  from the batch or from a frozen model, loss, backward); torchtitan clips, steps, logs and
  checkpoints. The loss is normalized by the GLOBAL number of pairs in the optimizer step (local
  pairs x gradient-accumulation steps x data-parallel degree), so gradients summed over ranks
  and micro-batches are those of the mean over pairs, and the logged loss is that mean.
* Reference modes: ``cached`` (``ref_logp`` in every batch, from ``compute_reference_logps``) or
  ``live`` (a second copy of the starting weights, read from ``init_weights_from``, eval mode,
  ``requires_grad=False``, run under ``no_grad``; never in the optimizer or the checkpoint, so a
  resumed run reloads the same reference). A live reference is an unsharded replica on every
  rank: fine for small models, use ``cached`` for large ones.
* A pair whose chosen and rejected rows are identical (ids and mask) carries no preference: its
  ``h`` is exactly 0 and it contributes exactly zero gradient (the trainer reuses the chosen
  row's log-prob for the rejected one; otherwise the two rows' gradients would cancel only up to
  floating-point rounding).
* Fast layouts (``dpo_layouts``): the loader's plain batch is the contract; the trainer,
  ``sequence_logps`` and ``compute_reference_logps`` score it through ``pack_pairs`` whenever its
  rows are one document each (``positions`` absent or ``0..L-1``): chosen and rejected share the
  prompt (a pivotal pair is one forward over the prompt), rows stop at the last scored token,
  short blocks are packed, and the LM head runs at scored positions only. The per-row log-probs
  are the plain layout's within fp32 rounding.

Tensor parallelism: the vocab-sharded logits are gathered on each TP rank (``_GatherVocab``)
and rows are scored unpacked. Not supported: pipeline parallelism.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.tools.logging import logger as titan_logger
from torchtitan.trainer import Trainer

from phi4_engine import ranks
from phi4_engine.data.mixture import IGNORE_INDEX  # torchtitan's value too
from phi4_engine.errors import EngineError
from phi4_engine.titan import attention
from phi4_engine.titan.dpo_layouts import is_plain_positions, pack_pairs, packed_logps, supports_custom_masks
from phi4_engine.titan.generate import load_model, load_model_weights
from phi4_engine.titan.trainer import (
    LMJob,
    Phi4Trainer,
    _process_group,
    attach_job,
    trainer_config,
    weights_sha256,
)

__all__ = [
    "DPOJob",
    "DPOResult",
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "PairsLoader",
    "Phi4DPOTrainer",
    "PreferencePair",
    "build_dpo_trainer",
    "compute_reference_logps",
    "dpo_sigmoid_loss",
    "encode_pairs",
    "ipo_loss",
    "logps_from_logits",
    "pairs_loader",
    "preference_losses",
    "run_dpo",
    "sequence_logps",
    "shifted_labels",
]

LOSS_KINDS = ("dpo-sigmoid", "ipo")
REFERENCE_MODES = ("live", "cached")


# -- losses ----------------------------------------------------------------------------------


def preference_losses(
    kind: str,
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``[B]`` and per-pair statistics (detached ``[B]`` tensors).

    Statistics: ``chosen_reward = beta * (pc - rc)``, ``rejected_reward = beta * (pr - rr)``,
    ``margin`` = ``h`` (the log-ratio difference), ``accuracy`` = ``h > 0``. The trainer logs
    their means per step as ``dpo/<name>`` (this rank's pairs).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown preference loss {kind!r}; known: {', '.join(LOSS_KINDS)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen_logp - ref_chosen_logp
    rejected_ratio = policy_rejected_logp - ref_rejected_logp
    h = chosen_ratio - rejected_ratio
    if kind == "dpo-sigmoid":
        losses = -F.logsigmoid(beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    stats = {
        "chosen_reward": (beta * chosen_ratio).detach(),
        "rejected_reward": (beta * rejected_ratio).detach(),
        "margin": h.detach(),
        "accuracy": (h > 0).to(h.dtype).detach(),
    }
    return losses, stats


def _mean(kind: str, *args: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses, stats = preference_losses(kind, *args)
    return losses.mean(), {k: v.mean() for k, v in stats.items()}


def dpo_sigmoid_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(-logsigmoid(beta * ((pc - rc) - (pr - rr))))`` over pairs; metrics are means of
    the :func:`preference_losses` statistics. Inputs are summed response log-probs ``[B]``."""
    return _mean("dpo-sigmoid", policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)


def ipo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean((h - 1/(2 beta))^2)``, ``h = (pc - rc) - (pr - rr)``. Pass per-token AVERAGED
    log-probs (as the IPO paper and TRL do); the trainer does so for ``ipo``."""
    return _mean("ipo", policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)


# -- sequence log-probs ----------------------------------------------------------------------


def _check_mask(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and loss_mask must both be [B, L]; got {tuple(input_ids.shape)} and {tuple(loss_mask.shape)}"
        )
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask must be bool, got {loss_mask.dtype}")
    if bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask is True at position 0: the first token has no context to be scored from")


def logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[B]`` of the masked tokens and their counts ``[B]`` from full logits.

    Logits at position ``t - 1`` score token ``t``; the log-softmax runs only at scored
    positions (a few per row for pivotal pairs), in fp32.
    """
    _check_mask(input_ids, loss_mask)
    scored = loss_mask[:, 1:]
    rows = scored.nonzero()[:, 0]
    picked = logits[:, :-1][scored].float()  # [N, V]
    targets = input_ids[:, 1:][scored]
    token_logp = -F.cross_entropy(picked, targets, reduction="none")
    batch = input_ids.shape[0]
    logp = torch.zeros(batch, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)
    return logp, scored.sum(dim=1)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    layout: str = "auto",
) -> torch.Tensor:
    """``logp[b] = sum_t loss_mask[b, t] * log p(input_ids[b, t] | input_ids[b, <t])``.

    ``model`` is a Phi-4 torchtitan model (as ``load_model`` builds it); ``positions``
    (optional, ``[B, L]``) restart at 0 per packed document and become a block-causal mask.
    ``layout="auto"`` scores one-document rows through ``dpo_layouts.pack_pairs`` (rows ``b`` and
    ``b + B/2`` share their common prefix, as a pair batch's do); ``"plain"`` runs the rows as
    given with full logits. Gradients flow when called outside ``no_grad``.
    """
    _check_mask(input_ids, loss_mask)
    if layout not in ("auto", "plain"):
        raise ValueError(f"layout must be 'auto' or 'plain', got {layout!r}")
    if layout == "auto" and is_plain_positions(positions, input_ids.shape):
        packed = pack_pairs(input_ids, loss_mask, custom_masks=supports_custom_masks(model))
        return packed_logps(model, packed)[0]
    kwargs: dict[str, Any] = {}
    if positions is not None:
        kwargs["positions"] = positions
        masks = attention.attention_masks_from_positions(positions)
        if masks is not None:
            kwargs["attention_masks"] = masks
    logits = model(input_ids, **kwargs)
    return logps_from_logits(logits, input_ids, loss_mask)[0]


# -- pairs and batches -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """Token ids of a prompt and two responses. The scored tokens are the responses (or their
    first ``score_first`` tokens, e.g. 5 for refusal DPO); a dpo-pivotal pair has one-token
    responses after a prompt that ends with the shared prefix."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]
    score_first: int | None = None


def _encode_row(prompt: Sequence[int], response: Sequence[int], score_first: int | None, seq_len: int, pad_id: int):
    if not prompt:
        raise ValueError("a preference pair needs a non-empty prompt (the first token is never scored)")
    if not response:
        raise ValueError("a preference pair needs non-empty responses")
    if score_first is not None and score_first < 1:
        raise ValueError(f"score_first must be >= 1 (tokens scored per response), got {score_first}")
    room = seq_len - len(prompt)
    if room <= 0:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for a response in seq_len {seq_len}")
    response = list(response)[:room]  # over-long responses are cut at seq_len
    ids = list(prompt) + response
    scored = len(response) if score_first is None else min(score_first, len(response))
    mask = [False] * len(prompt) + [True] * scored + [False] * (len(response) - scored)
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, mask + [False] * pad


def encode_pairs(pairs: Sequence[PreferencePair], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``{"input": [2B, L], "loss_mask": [2B, L], "positions": [2B, L]}``, chosen rows first,
    then rejected rows in the same order; right-padded with ``pad_id`` (never scored)."""
    rows = [_encode_row(p.prompt, p.chosen, p.score_first, seq_len, pad_id) for p in pairs]
    rows += [_encode_row(p.prompt, p.rejected, p.score_first, seq_len, pad_id) for p in pairs]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    positions = torch.arange(seq_len).expand(len(rows), -1).contiguous()
    return {"input": ids, "loss_mask": mask, "positions": positions}


def shifted_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """LM-style targets ``labels[:, t] = input_ids[:, t + 1]`` where that token is scored, else
    ``IGNORE_INDEX`` (the last column is always ignored)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return labels


class PairsLoader:
    """Batches of ``batch_size`` pairs for one data-parallel rank, endlessly, reshuffled per epoch.

    Global pair ``g`` of the stream is ``pairs[perm(epoch)[g % n]]`` with ``epoch = g // n`` and a
    permutation seeded by ``(seed, epoch)``; each step takes the next ``batch_size * world``
    stream slots and rank ``r`` the ``r``-th block. The state is the stream cursor (JSON).
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        *,
        dp_rank: int,
        dp_world_size: int,
        seq_len: int,
        batch_size: int,
        pad_id: int,
        ref_logps: Sequence[tuple[float, float]] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not pairs:
            raise ValueError("no preference pairs")
        if ref_logps is not None and len(ref_logps) != len(pairs):
            raise ValueError(f"{len(ref_logps)} reference log-prob pairs for {len(pairs)} pairs")
        self.pairs, self.ref_logps = pairs, ref_logps
        self.rank, self.world = dp_rank, dp_world_size
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.cursor = 0
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, g: int) -> int:
        n = len(self.pairs)
        epoch = g // n
        if not self.shuffle:
            return g % n
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][g % n]

    def __iter__(self) -> "PairsLoader":
        return self

    def __next__(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        start = self.cursor + self.rank * self.batch_size
        indices = [self._index(g) for g in range(start, start + self.batch_size)]
        self.cursor += self.batch_size * self.world
        batch = encode_pairs([self.pairs[i] for i in indices], self.seq_len, self.pad_id)
        if self.ref_logps is not None:
            chosen = [self.ref_logps[i][0] for i in indices]
            rejected = [self.ref_logps[i][1] for i in indices]
            batch["ref_logp"] = torch.tensor(chosen + rejected, dtype=torch.float32)
        return batch, shifted_labels(batch["input"], batch["loss_mask"])

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])


def pairs_loader(
    pairs: Sequence[PreferencePair],
    *,
    pad_id: int,
    ref_logps: Sequence[tuple[float, float]] | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> Callable[[int, int, int, int], PairsLoader]:
    """A ``DPOJob.make_loader``: ``(dp_rank, dp_world_size, seq_len, batch_size) -> PairsLoader``."""

    def make(dp_rank: int, dp_world_size: int, seq_len: int, batch_size: int) -> PairsLoader:
        return PairsLoader(
            pairs, dp_rank=dp_rank, dp_world_size=dp_world_size, seq_len=seq_len,
            batch_size=batch_size, pad_id=pad_id, ref_logps=ref_logps, seed=seed, shuffle=shuffle,
        )  # fmt: skip

    return make


# -- reference log-probs ---------------------------------------------------------------------


@torch.no_grad()
def compute_reference_logps(
    checkpoint: str,
    pairs: Sequence[PreferencePair],
    *,
    flavor: str,
    vocab_size: int,
    rope_theta: float,
    seq_len: int,
    pad_id: int,
    batch_size: int = 16,
) -> list[tuple[float, float]]:
    """``(chosen, rejected)`` summed log-probs of each pair under the frozen starting model.

    Sums, whatever the loss: the trainer turns them into per-token averages for ``ipo``. The
    values are fp32 numbers (exact as Python floats); the stage caches them keyed by the data
    and weights hashes and hands them to ``pairs_loader(ref_logps=...)``.
    """
    model = load_model(checkpoint, flavor=flavor, vocab_size=vocab_size, rope_theta=rope_theta, max_seq_len=seq_len)

    device = next(model.parameters()).device  # a GPU when there is one (load_model)

    def score(starts: list[int]) -> list[list[tuple[float, float]]]:
        done = []
        for start in starts:
            chunk = pairs[start : start + batch_size]
            batch = encode_pairs(chunk, seq_len, pad_id)
            logp = sequence_logps(model, batch["input"].to(device), batch["loss_mask"].to(device)).tolist()
            done.append(list(zip(logp[: len(chunk)], logp[len(chunk) :])))
        return done

    # Under --nproc the batches are dealt over the ranks (the same batches as in one process,
    # so the same numbers); every rank gets all of them.
    per_batch = ranks.split_work(list(range(0, len(pairs), batch_size)), score)
    return [tuple(x) for batch in per_batch for x in batch]  # type: ignore[misc]


# -- the trainer -----------------------------------------------------------------------------


class _GatherVocab(torch.autograd.Function):
    """A TP rank's vocab shard of the logits -> all the logits, on every TP rank. Each TP rank
    then computes the same DPO loss, so the gradient of its shard is its slice of the whole
    gradient: the backward takes the slice and communicates nothing."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.width = dist.get_rank(group), local.shape[-1]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width).contiguous(), None


def _gather_vocab_on(model: nn.Module, group: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise EngineError("DPO with tensor parallelism needs the model's lm_head")
    vocab, tp = lm_head.weight.shape[0], dist.get_world_size(group)
    if vocab % tp:
        raise EngineError(f"DPO with tensor parallelism needs the vocabulary ({vocab}) divisible by tp_degree ({tp})")

    def whole(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, DTensor):
            return out.full_tensor()
        return out if out.shape[-1] == vocab else _GatherVocab.apply(out, group)

    lm_head.register_forward_hook(whole)


class Phi4DPOTrainer(Phi4Trainer):
    """``Phi4Trainer`` whose batches are preference pairs (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        dpo_loss: str = "dpo-sigmoid"
        """``dpo-sigmoid`` (summed log-probs) or ``ipo`` (per-token averaged log-probs)."""
        dpo_beta: float = 0.1
        dpo_reference: str = "live"
        """``live``: a frozen copy of ``checkpoint.initial_load_path``; ``cached``: batches carry ``ref_logp``."""

    def __init__(self, config: Config) -> None:
        if config.dpo_loss not in LOSS_KINDS:
            raise ValueError(f"unknown preference loss {config.dpo_loss!r}; known: {', '.join(LOSS_KINDS)}")
        if config.dpo_reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {config.dpo_reference!r}")
        if not config.checkpoint.initial_load_path:
            raise ValueError("DPO starts from the previous stage's weights: set checkpoint.initial_load_path")
        super().__init__(config)
        if self.parallel_dims.pp_enabled:
            raise EngineError("DPO does not support pipeline parallelism; use fsdp2, hsdp or fsdp2+tp")
        # Tensor parallel: the LM head's logits are vocab shards; they are made whole on each
        # TP rank (the DPO log-probs need every class), and rows are scored unpacked (the
        # packed layout indexes hidden states, which sequence parallelism shards).
        self.tensor_parallel = self.parallel_dims.tp_enabled
        if self.tensor_parallel:
            _gather_vocab_on(self.model_parts[0], self.parallel_dims.get_mesh("tp").get_group())
        batch_degree = self.parallel_dims.get_mesh("batch").size() if self.parallel_dims.dp_enabled else 1
        self.pairs_per_step = config.training.local_batch_size * self.gradient_accumulation_steps * batch_degree
        self.custom_masks = supports_custom_masks(self.model_parts[0])
        self.reference: nn.Module | None = None
        if config.dpo_reference == "live":
            self.reference = self._build_reference(config.checkpoint.initial_load_path)
        self._stats: dict[str, list[float]] = {}
        report = self.metrics_processor.log

        def log_with_dpo(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            extra = dict(extra_metrics or {})
            for key, (total, count) in self._stats.items():
                extra[f"dpo/{key}"] = total / max(count, 1)
            self._stats = {}
            report(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

        self.metrics_processor.log = log_with_dpo

    def _build_reference(self, checkpoint: str) -> nn.Module:
        """The starting weights again, unsharded, frozen (same model config as the policy)."""
        with torch.device("cpu"):
            model = self.model_config.build()
        with torch.no_grad():
            model.init_states()
        load_model_weights(model, checkpoint)
        model = model.to(self.device)  # device only: a dtype cast would break the complex RoPE table
        model.requires_grad_(False)
        return model.eval()

    def _pair_logps(self, logp: torch.Tensor, inputs: torch.Tensor, loss_mask: torch.Tensor):
        """Split ``[2B]`` into chosen/rejected; identical pairs reuse the chosen value (exact 0)."""
        n = inputs.shape[0] // 2
        same = (inputs[:n] == inputs[n:]).all(dim=1) & (loss_mask[:n] == loss_mask[n:]).all(dim=1)
        chosen, rejected = logp[:n], logp[n:]
        return chosen, torch.where(same, chosen, rejected)

    @staticmethod
    def _logps(model, packed, model_inputs, extra, loss_mask):
        if packed is not None:
            return packed_logps(model, packed, model_inputs, **extra)
        logits = model(model_inputs, **extra)
        return logps_from_logits(logits, model_inputs, loss_mask)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        if not isinstance(input_dict, dict):
            raise EngineError("DPO does not support pipeline parallelism (issue #8)")
        input_dict = dict(input_dict)
        loss_mask = input_dict.pop("loss_mask")
        ref_logp = input_dict.pop("ref_logp", None)
        inputs = input_dict["input"]
        if inputs.shape[0] % 2:
            raise ValueError(f"a DPO batch holds chosen then rejected rows; got an odd {inputs.shape[0]} rows")
        if self.reference is None and ref_logp is None:
            raise ValueError("reference='cached' but the batch has no 'ref_logp'")
        _check_mask(inputs, loss_mask)
        packed = None
        if (not self.tensor_parallel and set(input_dict) <= {"input", "positions"}
                and is_plain_positions(input_dict.get("positions"), inputs.shape)):
            packed = pack_pairs(inputs, loss_mask, custom_masks=self.custom_masks)
            model_inputs, labels, extra = self.post_dataloading_process(packed.model_inputs(inputs.device), labels)
        else:  # rows holding several documents (or a custom mask): scored as given
            model_inputs, labels, extra = self.post_dataloading_process(input_dict, labels)
        config = self.config
        with self.train_context():
            logp, counts = self._logps(self.model_parts[0], packed, model_inputs, extra, loss_mask)
            if ref_logp is None:
                with torch.no_grad():
                    ref_logp = self._logps(self.reference, packed, model_inputs, extra, loss_mask)[0]
            ref_logp = ref_logp.to(logp)
            if config.dpo_loss == "ipo":
                denominator = counts.clamp_min(1).to(logp)
                logp, ref_logp = logp / denominator, ref_logp / denominator
            pc, pr = self._pair_logps(logp, inputs, loss_mask)
            rc, rr = self._pair_logps(ref_logp, inputs, loss_mask)
            losses, stats = preference_losses(config.dpo_loss, pc, pr, rc, rr, config.dpo_beta)
            loss = losses.sum() / self.pairs_per_step
            loss.backward()
        for key, value in stats.items():
            total, count = self._stats.get(key, (0.0, 0))
            self._stats[key] = (total + float(value.sum()), count + value.numel())
        return loss.detach()


# -- the job ---------------------------------------------------------------------------------


class _SizeOnlyTokenizer:
    """What torchtitan asks of a tokenizer (DPO batches arrive tokenized)."""

    eos_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise TypeError("DPO batches arrive tokenized; this placeholder only reports the vocabulary size")

    def decode(self, ids: list[int]) -> str:
        raise TypeError("DPO batches arrive tokenized; this placeholder only reports the vocabulary size")


@dataclass(kw_only=True)
class DPOJob(LMJob):
    """An :class:`LMJob` for preference pairs. ``batch_size`` and ``global_batch_size`` count
    PAIRS; ``make_loader(dp_rank, dp_world_size, seq_len, batch_size)`` returns a stateful
    iterator of pair batches (``pairs_loader``). ``init_weights_from`` is required (checked when
    the config is built): DPO starts from the previous stage's weights."""

    loss: str = "dpo-sigmoid"
    beta: float = 0.1
    reference: str = "live"  # "live" | "cached"
    tokenizer: Any = None  # batches arrive tokenized; only the vocabulary size is needed
    decay_type: str = "linear"
    min_lr_factor: float = 0.0
    weight_decay: float = 0.0


@dataclass
class DPOResult:
    step: int
    pairs: int
    final_checkpoint: str
    weights_sha256: str
    init_weights_sha256: str | None
    reference_weights_sha256: str | None  # live mode: must equal init_weights_sha256


def dpo_trainer_config(job: DPOJob) -> Phi4DPOTrainer.Config:
    if not job.init_weights_from:
        raise ValueError("DPO starts from the previous stage's weights: init_weights_from is required")
    if not os.path.isabs(job.init_weights_from):
        raise ValueError(f"init_weights_from must be an absolute path, got {job.init_weights_from!r}")
    lm = dataclasses.replace(job, tokenizer=job.tokenizer or _SizeOnlyTokenizer(job.vocab_size))
    base = trainer_config(lm)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    # The LM loss object is built by torchtitan but never called: DPO computes its own loss.
    fields["loss"] = CrossEntropyLoss.Config(global_vocab_size=job.vocab_size)
    config = Phi4DPOTrainer.Config(**fields, dpo_loss=job.loss, dpo_beta=job.beta, dpo_reference=job.reference)
    config.debug.seed = job.seed
    config.debug.deterministic = True
    return config


def build_dpo_trainer(job: DPOJob) -> Phi4DPOTrainer:
    """The trainer for ``job`` (inside a process group: see ``run_dpo``)."""
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    titan_logger.setLevel(logging.ERROR)
    return attach_job(Phi4DPOTrainer(dpo_trainer_config(job)), job)


def run_dpo(job: DPOJob) -> DPOResult:
    """Train ``job.steps`` DPO steps from ``job.init_weights_from`` (resuming from the job's own
    checkpoints when present), then tear the process group down (like ``run_lm``)."""
    with _process_group():
        trainer = build_dpo_trainer(job)
        try:
            trainer.train()
            return DPOResult(
                step=trainer.step,
                pairs=trainer.step * trainer.pairs_per_step,
                final_checkpoint=os.path.join(trainer.checkpointer.folder, f"step-{trainer.step}"),
                weights_sha256=weights_sha256(trainer.model_parts[0]),
                init_weights_sha256=trainer.init_weights_sha256,
                reference_weights_sha256=(
                    weights_sha256(trainer.reference) if trainer.reference is not None else None
                ),
            )
        finally:
            trainer.close()

