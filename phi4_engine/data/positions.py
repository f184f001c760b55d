"""Per-document positions for packed sequences (torch only; no torchtitan).

A packed row holds several documents, each ending with EOS. Its ``positions`` tell the model
where each document starts: RoPE rotates by them and the attention mask is built from them
(block-causal: a token sees the earlier tokens of its own document only).

Definition, for a row ``t[0..L-1]`` of *input* token ids (not the L+1 window the labels come
from) and ``eos_id``:

* a document starts at index 0 and at every index ``i > 0`` with ``t[i-1] == eos_id``;
* ``positions[i] = i - s`` where ``s`` is the last start ``<= i``.

So EOS is the last token of the document it closes (it keeps counting), and the token after it
is position 0. Consequences, all intended:

* no EOS in the row: ``positions = 0, 1, ..., L-1`` (one document);
* EOS at index ``L-1``: the next document starts in the next row, nothing changes here;
* EOS at index 0 (the tail of a document cut at the previous row): a one-token document;
* two EOS in a row: the second is a one-token document of its own;
* a row always starts at position 0, also when it continues a document cut at the previous
  row (as torchtitan's own loader does, ``hf_datasets/text_datasets.py``): the continuation is
  treated as a document of its own, and its positions stay below ``L``, inside the RoPE cache.

Document boundaries are recovered from positions alone as the indices where ``positions == 0``
(torchtitan's convention: ``get_document_mask_mod``, ``create_varlen_metadata_for_document``).
"""

from __future__ import annotations

import torch


def document_positions(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-document positions (LongTensor, same shape) of ``tokens`` ``[B, L]`` or ``[L]``."""
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.dim() == 1:
        return document_positions(tokens.unsqueeze(0), eos_id).squeeze(0)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, L] or [L], got shape {tuple(tokens.shape)}")
    batch, length = tokens.shape
    index = torch.arange(length, device=tokens.device).expand(batch, length)
    if length == 0:
        return index.clone()
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    # Index of the latest document start at or before each token.
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start
