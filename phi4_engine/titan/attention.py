"""Block-causal attention for packed sequences that also runs (and trains) on CPU.

A packed row holds several documents; ``positions`` restart at 0 where a document starts
(``phi4_engine.data.positions``). Block-causal attention lets a token see the earlier tokens of
its own document only, so a token's output does not depend on what else was packed around it.

Why a module of our own: torchtitan 0.3.0 masks documents only with ``FlexAttention`` (no
backward on CPU, FACTS.md §5 fix 7) and ``VarlenAttention`` (flash kernels, CUDA);
its ``ScaledDotProductAttention`` rejects masks and is causal only. ``DocumentSDPA`` calls
``F.scaled_dot_product_attention`` with an explicit boolean mask ``[B, 1, L, L]`` when one is
given and with ``is_causal=True`` (the same call as torchtitan's module) when not.

Where masks come from: torchtitan's Trainer builds ``attention_masks`` from ``positions`` for
Flex/Varlen only (``Trainer.post_dataloading_process``). ``prepare_attention_inputs`` does it for
``DocumentSDPA`` and is called from ``Phi4Trainer.post_dataloading_process``. Code that runs the
model outside the trainer passes ``attention_masks=attention_masks_from_positions(positions)``
itself; ``positions`` alone only moves RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import FlexAttention, VarlenAttention
from torchtitan.protocols.module import Module

__all__ = [
    "DocumentSDPA",
    "attention_masks_from_positions",
    "block_causal_mask",
    "document_ids",
    "prepare_attention_inputs",
]


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Document index of each token ``[B, L]``: a new document wherever ``positions == 0``.

    Tokens before the first 0 (a row whose positions do not start at 0) share index -1, the
    same convention as torchtitan's ``get_document_mask_mod``.
    """
    return torch.cumsum((positions == 0).to(torch.int32), dim=1) - 1


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[B, 1, L, L]``, True where query ``i`` may attend to key ``j``:
    ``j <= i`` and both in the same document. The diagonal is always True, so no row is
    fully masked (a fully masked softmax row would be NaN)."""
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, L], got shape {tuple(positions.shape)}")
    length = positions.shape[1]
    docs = document_ids(positions)
    same_document = docs.unsqueeze(2) == docs.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    return (same_document & causal).unsqueeze(1)


def attention_masks_from_positions(positions: torch.Tensor | None) -> torch.Tensor | None:
    """What ``DocumentSDPA`` takes as ``attention_masks``: ``None`` (plain causal, the fast
    path) when no row holds more than one document, else ``block_causal_mask(positions)``.

    A row is one document when no position after the first is 0; then block-causal equals
    causal. Long-document data (each row a chunk of one document) thus pays nothing.
    """
    if positions is None:
        return None
    if not bool((positions[:, 1:] == 0).any()):
        return None
    return block_causal_mask(positions)


class DocumentSDPA(Module):
    """Inner attention: ``F.scaled_dot_product_attention``, causal, optionally block-causal.

    Takes and returns ``(B, L, N, H)`` like torchtitan's inner attention modules.
    ``attention_masks`` is ``None`` (causal) or a boolean tensor ``[B, 1, L, L]`` from
    ``block_causal_mask``. Grouped-query attention uses SDPA's ``enable_gqa``; on CPU the
    flash kernel runs both the causal and the masked call (measured bitwise equal for a
    causal mask).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()

    # The argument names q_BLNH/k_BLNH/v_BLNH are part of torchtitan's contract: its TP plan
    # (decoder_sharding.set_gqa_inner_attention_local_map) keys q/k/v shardings by them.
    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: torch.Tensor | None = None,
        scale: float | None = None,
        enable_gqa: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        q_BNLH, k_BNLH, v_BNLH = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        if attention_masks is None:
            out_BNLH = F.scaled_dot_product_attention(
                q_BNLH, k_BNLH, v_BNLH, scale=scale, is_causal=True, enable_gqa=enable_gqa
            )
        else:
            if not (
                isinstance(attention_masks, torch.Tensor)
                and attention_masks.dtype == torch.bool
                and attention_masks.dim() == 4
            ):
                raise TypeError(
                    "DocumentSDPA takes attention_masks=None or a bool tensor [B, 1, L, L] "
                    f"from block_causal_mask(); got {type(attention_masks).__name__}"
                )
            out_BNLH = F.scaled_dot_product_attention(
                q_BNLH,
                k_BNLH,
                v_BNLH,
                attn_mask=attention_masks,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        return out_BNLH.transpose(1, 2)


def prepare_attention_inputs(
    model_config: Any, input_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Complete a loader batch (``{"input", ["positions"]}``) for the model's attention backend.

    * ``DocumentSDPA``: add ``attention_masks`` built from ``positions`` (torchtitan does not).
    * Flex/Varlen: torchtitan builds their masks from ``positions`` but has no mask at all
      without them (FlexAttention then fails its BlockMask assertion), so a batch without
      ``positions`` gets ``0..L-1`` per row: one document, i.e. plain causal.
    Returns a new dict; ``input_dict`` is not modified.
    """
    inner = _inner_attention_config(model_config)
    positions = input_dict.get("positions")
    if isinstance(inner, DocumentSDPA.Config):
        if positions is None or "attention_masks" in input_dict:
            return input_dict
        masks = attention_masks_from_positions(positions)
        return input_dict if masks is None else {**input_dict, "attention_masks": masks}
    if isinstance(inner, (FlexAttention.Config, VarlenAttention.Config)) and positions is None:
        tokens = input_dict["input"]
        arange = torch.arange(tokens.shape[1], device=tokens.device)
        return {**input_dict, "positions": arange.expand(tokens.shape[0], -1).contiguous()}
    return input_dict


def _inner_attention_config(model_config: Any) -> Any:
    attention = getattr(model_config, "first_attention", None)
    return getattr(attention, "inner_attention", None)
