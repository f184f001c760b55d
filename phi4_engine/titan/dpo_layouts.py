"""Fast DPO batch layouts: the plain layout's per-row log-probs for less compute.

The plain layout (``dpo.encode_pairs``) gives every pair two right-padded rows ``[2B, seq_len]``:
prompt + chosen, prompt + rejected. ``pack_pairs`` turns such a batch into a :class:`PackedBatch`
and ``packed_logps`` returns, per plain row, the summed log-probs of its scored tokens and their
count, as ``dpo.logps_from_logits`` does from the plain rows' full logits:

* **Only what is scored is computed.** A row's inputs stop before its LAST scored token (logits
  at ``t - 1`` score token ``t``; later tokens cannot change them, so a ``score_first`` response
  is cut there), and the LM head runs on the scored positions only (torchtitan's
  ``Decoder._skip_lm_head``), never over ``[rows, L, vocab]``.
* **Chosen and rejected share their common prefix** (the prompt, plus any identical first
  response tokens): one block = shared prefix + chosen tail + rejected tail; the rejected tail's
  positions continue from the prefix end and it attends to the prefix, not to the chosen tail.
  A pivotal pair (one-token responses after the same prompt) is then the prompt alone: one
  forward, both tokens read from its last position. Forking two tails needs an explicit mask,
  i.e. ``DocumentSDPA`` (the ``sdpa`` backend); with Flex/Varlen a pair shares a block only when
  one row's inputs are a prefix of the other's (pivotal and identical pairs: no mask needed).
* **No padding to seq_len.** Rows are as long as the batch's longest block. Blocks are packed
  first-fit-decreasing into rows no longer than that (a token attends only inside its block) when
  masks are needed anyway, or when packing saves at least a quarter of the rows (a mask costs
  the causal kernel's skipped half, measured on CPU).

These layouts change only which numbers are added in which order: per-row log-probs equal the
plain layout's within fp32 rounding (tests/unit/test_dpo_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PackedBatch", "is_plain_positions", "pack_pairs", "packed_logps", "supports_custom_masks"]

SHARED, CHOSEN_TAIL, REJECTED_TAIL = 0, 1, 2
PACK_MIN_SAVING = 0.25  # pack mask-free blocks only when it removes this share of the rows


@dataclass
class PackedBatch:
    """Packed rows and where each scored token of the plain batch is read from.

    ``tokens``/``positions`` ``[R, L]``; ``block``/``branch`` ``[R, L]`` (block index per token,
    -1 for padding; shared/chosen-tail/rejected-tail) and ``forks`` (per forked block: row,
    chosen tail start, chosen tail end = rejected tail start, rejected tail end) from which
    ``masks()`` builds the attention mask when ``needs_mask``; ``hidden_index`` ``[N]``: flat
    indices into the ``R * L`` positions whose logits score ``targets`` ``[N]`` for plain row
    ``owner`` ``[N]``; ``n_rows`` = plain rows; ``layout`` names the layout (``rows``,
    ``shared``, ``fork``, ``+packed``).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    block: torch.Tensor
    branch: torch.Tensor
    forks: list[tuple[int, int, int, int]]
    needs_mask: bool
    hidden_index: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    n_rows: int
    layout: str

    def masks(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Bool ``[R, 1, L, L]`` for ``DocumentSDPA`` (query sees key: causal, same block, and not
        rejected tail -> chosen tail), or ``None`` when plain causal attention is exact."""
        if not self.needs_mask:
            return None
        block = self.block.to(device)
        allowed = (block.unsqueeze(2) == block.unsqueeze(1)).tril_()
        for row, chosen_start, chosen_end, rejected_end in self.forks:
            allowed[row, chosen_end:rejected_end, chosen_start:chosen_end] = False
        return allowed.unsqueeze(1)

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """A loader-style input dict: ``{"input", "positions"[, "attention_masks"]}``."""
        out = {"input": self.tokens.to(device), "positions": self.positions.to(device)}
        masks = self.masks(device)
        if masks is not None:
            out["attention_masks"] = masks
        return out


def supports_custom_masks(model: nn.Module) -> bool:
    """True when the model's attention takes our explicit boolean masks (``DocumentSDPA``)."""
    from phi4_engine.titan.attention import DocumentSDPA

    return any(isinstance(m, DocumentSDPA) for m in model.modules())


def is_plain_positions(positions: torch.Tensor | None, shape: torch.Size) -> bool:
    """``None`` or ``0..L-1`` on every row: rows that are one document each (packable)."""
    if positions is None:
        return True
    arange = torch.arange(shape[1], device=positions.device)
    return positions.shape == shape and bool((positions == arange).all())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _first_fit_decreasing(sizes: list[int], width: int) -> list[list[int]]:
    rows: list[list[int]] = []
    fill: list[int] = []
    for b in sorted(range(len(sizes)), key=lambda b: (-sizes[b], b)):
        for k, used in enumerate(fill):
            if used + sizes[b] <= width:
                rows[k].append(b)
                fill[k] += sizes[b]
                break
        else:
            rows.append([b])
            fill.append(sizes[b])
    return rows


def pack_pairs(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    custom_masks: bool = True,
    share_prompt: bool = True,
    pack: bool = True,
    pad_id: int = 0,
) -> PackedBatch:
    """The fast layout of a plain batch ``[2B, L]`` (chosen rows first; row ``i`` and ``i + B`` are
    a pair; an odd last row stands alone). ``loss_mask`` must be valid (``dpo._check_mask``).

    ``custom_masks=False`` (Flex/Varlen backends): only mask-free layouts (no forked tails, no
    packing). ``share_prompt``/``pack`` switch those ideas off (tests and the benchmark).
    """
    n_rows = input_ids.shape[0]
    half = n_rows // 2
    ids = input_ids.tolist()
    columns = loss_mask[:, 1:].nonzero()[:, 1].tolist()  # t - 1 per scored token t, row by row
    scored, start = [], 0
    for count in loss_mask[:, 1:].sum(dim=1).tolist():
        scored.append(columns[start : start + count])
        start += count
    needed = [ids[r][: cols[-1] + 1] if cols else [] for r, cols in enumerate(scored)]

    # blocks: (tokens, positions, branch per token, [(owner row, column in block, target id)])
    blocks: list[tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]] = []

    def single(r: int) -> None:
        if needed[r]:
            seq = needed[r]
            blocks.append((seq, list(range(len(seq))), [SHARED] * len(seq), [(r, c, ids[r][c + 1]) for c in scored[r]]))

    shared = False  # some pair shares a block
    for c, r in zip(range(half), range(half, 2 * half)):
        cin, rin = needed[c], needed[r]
        s = _common_prefix(cin, rin) if share_prompt else 0
        fork = s < len(cin) and s < len(rin)  # both rows go on after the shared prefix
        if s == 0 or (fork and not custom_masks):
            single(c)
            single(r)
            continue
        tokens = cin + rin[s:]
        positions = list(range(len(cin))) + list(range(s, len(rin)))
        branch = [SHARED] * s + [CHOSEN_TAIL if fork else SHARED] * (len(cin) - s)
        branch += [REJECTED_TAIL if fork else SHARED] * (len(rin) - s)
        entries = [(c, col, ids[c][col + 1]) for col in scored[c]]
        entries += [(r, col if col < s else len(cin) + col - s, ids[r][col + 1]) for col in scored[r]]
        blocks.append((tokens, positions, branch, entries))
        shared = True
    if n_rows % 2:
        single(n_rows - 1)
    if not blocks:  # nothing scored anywhere: one token keeps the model call well-formed
        blocks.append(([pad_id], [0], [SHARED], []))

    sizes = [len(b[0]) for b in blocks]
    forked = any(REJECTED_TAIL in b[2] for b in blocks)
    rows = [[b] for b in range(len(blocks))]
    if pack and custom_masks and len(blocks) > 1:
        packed = _first_fit_decreasing(sizes, max(sizes))
        if forked or len(packed) <= (1 - PACK_MIN_SAVING) * len(rows):
            rows = packed
    multi = any(len(members) > 1 for members in rows)

    length = max(sum(sizes[b] for b in members) for members in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.arange(length).repeat(len(rows), 1)  # padding continues its row
    block_id = torch.full((len(rows), length), -1, dtype=torch.long)
    branch_t = torch.full((len(rows), length), SHARED, dtype=torch.long)
    index: list[int] = []
    owner: list[int] = []
    target: list[int] = []
    forks: list[tuple[int, int, int, int]] = []
    for k, members in enumerate(rows):
        offset = 0
        for b in members:
            seq, pos, branch, entries = blocks[b]
            end = offset + len(seq)
            tokens[k, offset:end] = torch.tensor(seq)
            positions[k, offset:end] = torch.tensor(pos)
            block_id[k, offset:end] = b
            branch_t[k, offset:end] = torch.tensor(branch)
            if REJECTED_TAIL in branch:
                chosen_start, rejected_start = branch.index(CHOSEN_TAIL), branch.index(REJECTED_TAIL)
                forks.append((k, offset + chosen_start, offset + rejected_start, end))
            for o, col, t in entries:
                index.append(k * length + offset + col)
                owner.append(o)
                target.append(t)
            offset = end
    needs_mask = forked or multi
    if needs_mask:  # padding is its own block; keep its positions inside the RoPE table
        positions[block_id == -1] = 0
    name = "fork" if forked else "shared" if shared else "rows"
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        block=block_id,
        branch=branch_t,
        forks=forks,
        needs_mask=needs_mask,
        hidden_index=torch.tensor(index, dtype=torch.long),
        targets=torch.tensor(target, dtype=torch.long),
        owner=torch.tensor(owner, dtype=torch.long),
        n_rows=n_rows,
        layout=name + ("+packed" if multi else ""),
    )


def packed_logps(
    model: nn.Module, batch: PackedBatch, tokens: torch.Tensor | None = None, **model_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[n_rows]`` (fp32) and scored-token counts ``[n_rows]`` per plain row.

    ``tokens`` and ``model_kwargs`` (``positions``, ``attention_masks``): the forward's inputs
    when the caller prepared them from ``batch.model_inputs()``, as the trainer does; by default
    built here. The LM head runs on the scored positions only when the model is a torchtitan
    ``Decoder`` (``_skip_lm_head``); any other model's full logits are indexed instead.
    """
    device = next(model.parameters()).device
    if tokens is None:
        model_kwargs = batch.model_inputs(device)
        tokens = model_kwargs.pop("input")
    index = batch.hidden_index.to(device)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and hasattr(model, "_skip_lm_head"):
        model._skip_lm_head = True
        try:
            hidden = model(tokens, **model_kwargs)
        finally:
            model._skip_lm_head = False
        logits = lm_head(hidden.reshape(-1, hidden.shape[-1])[index])
    else:
        full = model(tokens, **model_kwargs)
        logits = full.reshape(-1, full.shape[-1])[index]
    owner = batch.owner.to(device)
    token_logp = -F.cross_entropy(logits.float(), batch.targets.to(device), reduction="none")
    logp = torch.zeros(batch.n_rows, dtype=token_logp.dtype, device=device).index_add(0, owner, token_logp)
    return logp, torch.bincount(owner, minlength=batch.n_rows)
