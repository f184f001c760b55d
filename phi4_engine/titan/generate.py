"""Batched sampling with a KV cache on the Phi-4 torchtitan model.

The cached forward below reuses the torchtitan modules themselves (``tok_embeddings``, each
block's ``attention_norm`` / ``attention.qkv_linear`` / ``attention.rope`` / ``attention.wo`` /
``ffn_norm`` / ``feed_forward``, then ``norm`` and ``lm_head``): it owns no weights and only
replaces the block's inner attention by SDPA over a preallocated KV cache with an explicit mask.
That keeps it independent of whichever inner attention the training model uses (SDPA,
flex, block-causal), and a test checks its logits against the model's own forward.

Batching: prompts of different lengths are LEFT-padded to one width, so every row writes its
next key/value at the same cache slot each step. Row ``b`` with ``pad[b]`` pad slots gets RoPE
position ``slot - pad[b]`` (its real tokens start at position 0, exactly as when alone) and a
mask that hides its pad slots (``pad[b] <= key slot <= query slot``). Rows that finish are
dropped from the batch (their cache rows are compacted away), so later steps cost only the
rows still running.

Stopping: a row stops at the first sampled id in ``eos_ids``. The stop id is NOT part of the
returned tokens; :meth:`Generator.generate_completions` reports it (``finish_reason="stop"``,
``stop_id``) or ``finish_reason="length"`` when ``max_new_tokens`` ran out.

Determinism: greedy (``temperature=0``) is an argmax, so a prompt gets the same tokens alone or
in any batch (up to float rounding at exact near-ties). Sampling draws from one
``torch.Generator`` seeded per call: the same prompts, batch and seed give the same tokens; a
different batch composition draws differently.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F

from phi4_engine import checkpoints
from phi4_engine.errors import EngineError
from phi4_engine.titan import phi4, safe_metadata

__all__ = [
    "CachedDecoder",
    "Completion",
    "Generator",
    "KVCache",
    "load_model",
    "load_model_weights",
    "resolve_checkpoint",
    "save_weights",
]


# -- loading ---------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP checkpoint folder: ``path`` itself, or its newest committed ``step-N`` child."""
    path = Path(path)
    if (path / ".metadata").is_file() or checkpoints.is_committed(path):
        return path  # a checkpoint itself (verified, with any missing file named, by the caller)
    committed = [p for p in checkpoints.step_dirs(path).values() if checkpoints.is_committed(p)]
    if not committed:
        raise EngineError(f"generate: no committed DCP checkpoint at {path} (no .metadata, no step-N with a manifest)")
    return committed[-1]


def save_weights(state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Save a model state dict as a committed DCP checkpoint (with its sha256 manifest) that
    ``load_model_weights`` and a stage's initial load accept. Without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    checkpoints.write_manifest(folder, 0, checkpoints.hash_files(folder, checkpoints.checkpoint_files(folder)))
    return Path(folder)


def load_model_weights(model: nn.Module, checkpoint_dir: str | Path) -> Path:
    """Load the model weights (only) of a torchtitan DCP checkpoint into ``model`` in place.

    torchtitan's CheckpointManager flattens the model's state dict into the top level of the
    checkpoint, keyed by plain FQNs (``layers.0.attention.qkv_linear.wq.weight``), next to
    ``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*`` and ``train_state.*``; DCP reads only
    the keys asked for, so passing the model's own state dict loads the weights and nothing
    else. Runs without a process group (``no_dist``). Returns the folder it read.
    """
    folder = resolve_checkpoint(checkpoint_dir)
    checkpoints.verify(folder)  # never read weights that differ from what was saved
    reader = dcp.FileSystemReader(str(folder))
    stored = safe_metadata.read_metadata(folder).state_dict_metadata
    state = model.state_dict()
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise EngineError(
            f"generate: checkpoint {folder} lacks model weights {', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''} (wrong flavor or not a Phi-4 checkpoint?)"
        )
    for key, tensor in state.items():
        size = getattr(stored[key], "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise EngineError(
                f"generate: {key} is {tuple(size)} in {folder} but {tuple(tensor.shape)} in the "
                "model (wrong flavor or vocab size?)"
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    # DCP fills the state-dict tensors in place (they alias the parameters); load_state_dict
    # also runs any module load hooks (e.g. a fused-QKV merge) and checks nothing is left out.
    model.load_state_dict(state, strict=True)
    return folder


def load_model(
    checkpoint_dir: str,
    *,
    flavor: str,
    vocab_size: int,
    rope_theta: float,
    max_seq_len: int,
) -> nn.Module:
    """Build the Phi-4 model in fp32 on this process's GPU when there is one (under torchrun:
    the rank's ``LOCAL_RANK`` device, set by ``ranks.launched_group``), else on CPU, and load a
    DCP checkpoint's model weights; generation and evaluation run where the model is. Built
    there directly: under --nproc every rank loads the policy, and a CPU copy per rank would
    multiply host memory by the number of ranks.

    ``max_seq_len`` sizes the RoPE table (not stored in checkpoints), i.e. the longest
    prompt + generation the model may run; it need not equal the training ``seq_len``.
    """
    spec = phi4.model_spec(flavor, vocab_size=vocab_size, rope_theta=rope_theta, max_seq_len=max_seq_len)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with device:
        model = spec.model.build()
    with torch.no_grad():
        model.init_states()
    # Built in fp32 already. Never ``model.to(torch.float32)``: Module.to casts complex buffers
    # too, which would drop the imaginary half of the RoPE table (a silent wrong model).
    load_model_weights(model, checkpoint_dir)
    return model.eval()


# -- the cached forward ----------------------------------------------------------------------


class KVCache:
    """Per layer ``[B, n_kv_heads, max_len, head_dim]`` keys and values, filled left to right.

    ``pad[b]`` is how many leading slots of row ``b`` are padding; ``length`` how many slots
    are written (shared by all rows).
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        pad: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pad = (
            torch.zeros(batch, dtype=torch.long, device=device)
            if pad is None
            else pad.to(device=device, dtype=torch.long)
        )
        self.length = 0
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return int(self.pad.shape[0])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), in that order."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.pad = self.pad.index_select(0, rows)


class CachedDecoder:
    """Runs a torchtitan Phi-4 (Llama-style) decoder incrementally over a :class:`KVCache`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = list(model.layers.values())
        first = self.layers[0].attention
        self.n_kv_heads: int = first.n_kv_heads
        self.head_dim: int = first.head_dim
        self.max_seq_len: int = int(first.rope.cache.shape[0])
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        if max_len > self.max_seq_len:
            raise ValueError(
                f"generate: {max_len} positions exceed the model's RoPE table ({self.max_seq_len}); "
                "load the model with a larger max_seq_len"
            )
        return KVCache(
            n_layers=len(self.layers), batch=batch, n_kv_heads=self.n_kv_heads, max_len=max_len,
            head_dim=self.head_dim, pad=pad, dtype=self.dtype, device=self.device,
        )  # fmt: skip

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """Append ``tokens`` ``[B, L]`` at the cache's next slots; logits ``[B, L or 1, V]``."""
        batch, length = tokens.shape
        start, end = cache.length, cache.length + tokens.shape[1]
        if batch != cache.batch:
            raise ValueError(f"generate: {batch} rows of tokens for a cache of {cache.batch}")
        if end > cache.max_len:
            raise ValueError(f"generate: cache holds {cache.max_len} slots, asked to fill {end}")
        device = cache.pad.device
        slots = torch.arange(start, end, device=device)
        positions = (slots[None, :] - cache.pad[:, None]).clamp_min(0)  # [B, L]
        keys = torch.arange(end, device=device)
        # A query sees its own row's real keys up to itself. A pad query sees only itself: its
        # output is never used, and an all-masked row would make SDPA return NaN.
        mask = (keys[None, None, :] >= cache.pad[:, None, None]) & (keys[None, None, :] <= slots[None, :, None])
        mask |= keys[None, None, :] == slots[None, :, None]
        mask = mask[:, None]  # [B, 1, L, end], broadcast over heads

        model = self.model
        h = model.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            attention = layer.attention
            x = layer.attention_norm(h)
            xq, xk, xv = attention.qkv_linear(x)  # [B, L, heads, head_dim]
            if getattr(attention, "q_norm", None) is not None:
                xq, xk = attention.q_norm(xq), attention.k_norm(xk)
            xq, xk = attention.rope(xq, xk, positions)
            cache.k[i][:, :, start:end] = xk.transpose(1, 2)
            cache.v[i][:, :, start:end] = xv.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                xq.transpose(1, 2),
                cache.k[i][:, :, :end],
                cache.v[i][:, :, :end],
                attn_mask=mask,
                scale=getattr(attention, "scaling", None),
                enable_gqa=xq.shape[2] != xk.shape[2],
            )
            h = h + attention.wo(out.transpose(1, 2).flatten(2))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        cache.length = end
        if last_only:
            h = h[:, -1:]
        return model.lm_head(model.norm(h))

    __call__ = forward


# -- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One row's new tokens (stop id excluded) and why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (an eos id was sampled) | "length" (max_new_tokens reached)
    stop_id: int | None = None


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next ids ``[B]`` from last-position logits ``[B, V]``: argmax, or nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest head whose mass reaches top_p: drop a token once the mass BEFORE it
    # already does (the most likely token always stays).
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class Generator:
    """Batched generation for a torchtitan Phi-4 model (see the module docstring)."""

    def __init__(self, model: nn.Module, *, eos_ids: set[int] | Iterable[int], pad_id: int) -> None:
        self.model = model.eval()
        self.decoder = CachedDecoder(self.model)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Iterable[int] | None = None,
    ) -> list[list[int]]:
        """New tokens per prompt (stop id excluded). ``temperature=0`` is greedy."""
        return [
            c.tokens
            for c in self.generate_completions(
                prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed, eos_ids=eos_ids,
            )  # fmt: skip
        ]

    @torch.no_grad()
    def generate_completions(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Iterable[int] | None = None,
    ) -> list[Completion]:
        """Like :meth:`generate`, with each row's finish reason and stop id.

        ``eos_ids`` (optional) replaces the generator's stop set for this call.
        """
        stop = self.eos_ids if eos_ids is None else frozenset(int(i) for i in eos_ids)
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0.0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if not prompts:
            return []
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        if width + max_new_tokens > self.decoder.max_seq_len:
            raise ValueError(
                f"generate: prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's max_seq_len ({self.decoder.max_seq_len})"
            )
        if max_new_tokens == 0:
            return [Completion([], "length") for _ in prompts]

        device = self.decoder.device
        batch = len(prompts)
        tokens = torch.full((batch, width), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        pad = torch.tensor([width - n for n in lengths], dtype=torch.long)
        cache = self.decoder.new_cache(batch, width + max_new_tokens - 1, pad)
        rng = torch.Generator(device=device).manual_seed(seed)

        out: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * batch
        stop_ids: list[int | None] = [None] * batch
        active = list(range(batch))  # prompt index of each cache row
        logits = self.decoder(tokens.to(device), cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, temperature=temperature, top_p=top_p, generator=rng)
            keep = []
            for r, (row, tok) in enumerate(zip(active, next_ids.tolist())):
                if tok in stop:
                    reasons[row], stop_ids[row] = "stop", tok
                else:
                    out[row].append(tok)
                    keep.append(r)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                cache.select(rows)
                next_ids = next_ids.index_select(0, rows)
                active = [active[r] for r in keep]
            logits = self.decoder(next_ids[:, None], cache)[:, -1]
        return [Completion(out[i], reasons[i], stop_ids[i]) for i in range(batch)]

    def generate_text(
        self,
        tokenizer: Any,
        messages_list: Sequence[Sequence[Mapping[str, str]]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """Assistant replies to chat conversations, stopping at ``<|im_end|>`` (not included).

        Each conversation is rendered with ``tokenizer.encode_chat(messages,
        add_generation_prompt=True)``; the generator's own eos ids stop a reply too.
        """
        prompts = [tokenizer.encode_chat(messages, add_generation_prompt=True)[0] for messages in messages_list]
        replies = self.generate(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, eos_ids=self.eos_ids | {tokenizer.im_end_id},
        )  # fmt: skip
        return [tokenizer.decode(ids) for ids in replies]
