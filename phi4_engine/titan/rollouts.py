"""The model side of Pivotal Token Search (:mod:`phi4_engine.pts`): batched rollouts, each with its
own random stream, verified by a verifier plugin; and the policy's per-token log-probs.

:class:`RolloutSampler` decodes over the same KV cache as :class:`~phi4_engine.titan.generate.
Generator` (its :class:`CachedDecoder`), with two differences that PTS needs:

* every row samples with its own counter-based random stream (:func:`phi4_engine.pts.uniform` of
  the row's key and the step, by inverse CDF), so a rollout's tokens do not depend on which other
  rows share its batch; ``Generator`` draws all rows from one ``torch.Generator`` per call, so
  its samples change with the batch's composition and a resumed search would not reproduce an
  uninterrupted one;
* the many rollouts of one prefix share its prompt: each distinct prompt of a chunk is
  prefilled once and its cache rows are then repeated for its rollouts.

Rows are LEFT-padded, finished rows are dropped from the batch, and a row stops at a stop id
(excluded from its tokens) or at its own length budget, all as in ``Generator``.

:class:`ModelEstimator` is the :class:`~phi4_engine.pts.SuccessEstimator` over a model: one call
samples the rollouts of many prefixes (of many questions) in chunks of ``max_rows`` rows, decodes
prefix + completion per rollout (text only for the verifier) and calls ``verify_many`` once.
:class:`ModelLogProbs` is the search's :data:`~phi4_engine.pts.LogProbFn`.
:func:`build_search` wires both to a :class:`~phi4_engine.pts.PivotalTokenSearch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from phi4_engine import ranks
from phi4_engine.pts import (
    NO_TOKEN,
    Estimate,
    PivotalTokenSearch,
    PrefixRequest,
    PTSCache,
    PTSConfig,
    SamplingParams,
    rollout_keys,
    uniform,
)
from phi4_engine.titan.generate import CachedDecoder, Completion
from phi4_engine.titan.trainer import weights_sha256

__all__ = ["ModelEstimator", "ModelLogProbs", "RolloutSampler", "build_search", "sample_from_uniforms"]


_BLOCK = 256


def sample_from_uniforms(logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """Next ids ``[B]`` from logits ``[B, V]`` and one uniform per row ``u`` ``[B]`` (inverse CDF
    of the tempered, nucleus-filtered distribution); argmax when ``temperature == 0``.

    The inverse CDF runs in two levels: cumulative block sums (blocks of 256 ids) pick the
    block, a float64 cumulative sum inside it picks the id; a float64 cumsum over the whole
    vocabulary per step would cost a third of a rollout on CPU. Every operation is row-wise, so a row's draw does not
    depend on the other rows, and a zero-probability id is never picked.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    x = logits.float()
    weights = ((x - x.amax(dim=-1, keepdim=True)) / temperature).exp_()  # unnormalized: the CDF rescales
    order = None
    if top_p < 1.0:
        probs, order = (weights / weights.sum(dim=-1, keepdim=True)).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs
        weights = probs.masked_fill(before >= top_p, 0.0)  # as generate.sample_next: head reaching top_p
    rows, vocab = weights.shape
    full = vocab // _BLOCK * _BLOCK
    mass = weights[:, :full].view(rows, full // _BLOCK, _BLOCK).sum(dim=-1)
    if full < vocab:
        mass = torch.cat([mass, weights[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    mass = mass.double()  # [B, blocks]
    cum = mass.cumsum(dim=-1)
    target = u.to(device=cum.device, dtype=torch.float64) * cum[:, -1]
    # The first block whose cumulative mass exceeds the target (so it has mass), then the first
    # id inside it whose cumulative weight exceeds what is left of the target.
    block = torch.searchsorted(cum, target[:, None], right=True).clamp_max(mass.shape[1] - 1)  # [B, 1]
    rest = target[:, None] - (cum.gather(1, block) - mass.gather(1, block))
    cols = block * _BLOCK + torch.arange(_BLOCK, device=weights.device)  # [B, 256]
    inner = weights.gather(1, cols.clamp_max(vocab - 1)).masked_fill(cols >= vocab, 0.0).double().cumsum(dim=-1)
    top = inner[:, -1:]
    rest = torch.minimum(rest.clamp_min(0.0), torch.nextafter(top, torch.zeros_like(top)))
    choice = block * _BLOCK + torch.searchsorted(inner, rest, right=True).clamp_max(_BLOCK - 1)
    if order is not None:
        choice = order.gather(-1, choice)
    return choice.squeeze(-1)


class RolloutSampler:
    """Samples completions for (prompt, row keys, budget) groups through a KV cache."""

    def __init__(self, model: nn.Module, *, stop_ids: Iterable[int], pad_id: int, max_rows: int = 256) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.decoder = CachedDecoder(model.eval())
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.pad_id, self.max_rows = int(pad_id), max_rows
        self.rows_sampled = 0  # by this rank (under --nproc each rank samples its share)
        self.tokens_sampled = 0

    def sample(self, prompts: Sequence[Sequence[int]], keys: Sequence[Sequence[int]], budgets: Sequence[int], *,
               temperature: float, top_p: float) -> list[list[Completion]]:
        """For each prompt ``i``, one completion per key in ``keys[i]`` with at most
        ``budgets[i]`` new tokens. Rows run ``max_rows`` at a time."""
        if not len(prompts) == len(keys) == len(budgets):
            raise ValueError("sample: prompts, keys and budgets differ in length")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("sample: every prompt needs at least one token")
        rows = [(i, k) for i, ks in enumerate(keys) for k in ks]
        chunks = [rows[start : start + self.max_rows] for start in range(0, len(rows), self.max_rows)]
        # Under --nproc the chunks are dealt over the ranks; a chunk is the same batch under any
        # world size, so the completions are too (each row draws from its own key).
        per_chunk = ranks.split_work(
            chunks, lambda share: [self._chunk(prompts, budgets, chunk, temperature, top_p) for chunk in share]
        )
        done: list[Completion] = [c for chunk in per_chunk for c in chunk]
        out: list[list[Completion]] = []
        at = 0
        for ks in keys:
            out.append(done[at : at + len(ks)])
            at += len(ks)
        return out

    @torch.no_grad()
    def _chunk(self, prompts, budgets, rows, temperature, top_p) -> list[Completion]:
        result: list[Completion | None] = [None] * len(rows)
        live = [r for r, (i, _) in enumerate(rows) if budgets[i] > 0]
        for r, (i, _) in enumerate(rows):
            if budgets[i] <= 0:
                result[r] = Completion([], "length")
        if not live:
            return result  # type: ignore[return-value]
        uniq: dict[int, int] = {}
        for r in live:
            uniq.setdefault(rows[r][0], len(uniq))
        order = list(uniq)
        lengths = [len(prompts[i]) for i in order]
        width, most = max(lengths), max(budgets[rows[r][0]] for r in live)
        if width + most > self.decoder.max_seq_len:
            raise ValueError(f"rollouts: prompt ({width}) + new tokens ({most}) exceed the model's max_seq_len "
                             f"({self.decoder.max_seq_len}); load the model with a larger max_seq_len")
        device = self.decoder.device
        tokens = torch.full((len(order), width), self.pad_id, dtype=torch.long)
        for row, i in enumerate(order):
            tokens[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]), dtype=torch.long)
        pad = torch.tensor([width - n for n in lengths], dtype=torch.long)
        cache = self.decoder.new_cache(len(order), width + most - 1, pad)  # the last draw is never fed
        logits = self.decoder(tokens.to(device), cache, last_only=True)[:, -1]
        expand = torch.tensor([uniq[rows[r][0]] for r in live], dtype=torch.long, device=device)
        cache.select(expand)  # each distinct prompt's cache rows, repeated for its rollouts
        logits = logits.index_select(0, expand)

        active = list(live)  # chunk row of each batch row
        out: dict[int, list[int]] = {r: [] for r in live}
        for step in range(most):
            u = torch.tensor([uniform(rows[r][1], step) for r in active], dtype=torch.float64, device=device)
            next_ids = sample_from_uniforms(logits, u, temperature=temperature, top_p=top_p)
            keep = []
            for b, (r, tok) in enumerate(zip(active, next_ids.tolist())):
                if tok in self.stop_ids:
                    result[r] = Completion(out[r], "stop", tok)
                    continue
                out[r].append(tok)
                if len(out[r]) >= budgets[rows[r][0]]:
                    result[r] = Completion(out[r], "length")
                else:
                    keep.append(b)
            self.tokens_sampled += len(active)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                cache.select(idx)
                next_ids = next_ids.index_select(0, idx)
                active = [active[b] for b in keep]
            logits = self.decoder(next_ids[:, None], cache)[:, -1]
        self.rows_sampled += len(live)
        return result  # type: ignore[return-value]


class ModelEstimator:
    """:class:`~phi4_engine.pts.SuccessEstimator` over a Phi-4 model, a tokenizer (``decode``,
    ``im_end_id``, ``eos_id``, ``pad_id``) and a verifier plugin object (``name``, ``version``,
    ``verify_many([(meta, text), ...])``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, verifier: Any, *, stop_ids: Iterable[int] | None = None,
                 max_rows: int = 256) -> None:
        stop = {tokenizer.im_end_id, tokenizer.eos_id} if stop_ids is None else set(stop_ids)
        self.sampler = RolloutSampler(model, stop_ids=stop, pad_id=tokenizer.pad_id, max_rows=max_rows)
        self.tokenizer, self.verifier = tokenizer, verifier
        self.verifier_id = f"{verifier.name}@{verifier.version}"

    def estimate(self, requests: Sequence[PrefixRequest], params: SamplingParams) -> list[Estimate]:
        prompts = [[*r.question.prompt_ids, *r.prefix] for r in requests]
        keys = [rollout_keys(params.seed, r.question.prompt_ids, r.prefix, params.rollouts) for r in requests]
        budgets = [max(params.max_new_tokens - len(r.prefix), 0) for r in requests]
        completions = self.sampler.sample(prompts, keys, budgets, temperature=params.temperature, top_p=params.top_p)
        decode = self.tokenizer.decode
        items = [(dict(r.question.meta or {}), decode([*r.prefix, *c.tokens]))
                 for r, cs in zip(requests, completions) for c in cs]  # fmt: skip
        verdicts = iter(ranks.split_work(items, self.verifier.verify_many))
        out = []
        for r, cs in zip(requests, completions):
            first = tuple(c.tokens[0] if c.tokens else (c.stop_id if c.stop_id is not None else NO_TOKEN) for c in cs)
            ok = tuple(bool(next(verdicts)) for _ in cs)
            full = tuple(tuple(c.tokens) for c in cs) if r.keep else None
            out.append(Estimate(first, ok, full))
        return out


class ModelLogProbs:
    """``log p(response[i] | prompt + response[:i])`` per token, many sequences per forward
    (left-padded through the KV-cache decoder; at most ``max_tokens`` padded positions each)."""

    def __init__(self, model: nn.Module, *, max_tokens: int = 4096) -> None:
        self.decoder = CachedDecoder(model.eval())
        self.max_tokens = max_tokens

    @torch.no_grad()
    def __call__(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        chunks: list[list[int]] = []
        chunk: list[int] = []
        for i in order + [None]:  # type: ignore[list-item]
            size = 0 if i is None else len(items[i][0]) + len(items[i][1])
            if chunk and (i is None or size * (len(chunk) + 1) > self.max_tokens):
                chunks.append(chunk)
                chunk = []
            if i is not None:
                chunk.append(i)
        # Chunks are dealt over the ranks under --nproc (the same batches as in one process).
        per_chunk = ranks.split_work(chunks, lambda share: [self._chunk(items, c) for c in share])
        out: list[list[float]] = [[] for _ in items]
        for c, values in zip(chunks, per_chunk):
            for i, v in zip(c, values):
                out[i] = v
        return out

    def _chunk(self, items, chunk: list[int]) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in chunk]
        seqs = [[*items[i][0], *items[i][1]] for i in chunk]
        width = max(len(s) for s in seqs)
        if width > self.decoder.max_seq_len:
            raise ValueError(f"log-probs: {width} tokens exceed the model's max_seq_len ({self.decoder.max_seq_len})")
        tokens = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            tokens[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        pad = torch.tensor([width - len(s) for s in seqs], dtype=torch.long)
        cache = self.decoder.new_cache(len(seqs), width, pad)
        logits = self.decoder(tokens.to(self.decoder.device), cache)  # [B, W, V]
        for row, i in enumerate(chunk):
            prompt, response = items[i]
            if not response:
                continue
            if not prompt:
                raise ValueError("log-probs: a prompt needs at least one token")
            start = width - len(seqs[row]) + len(prompt) - 1  # position predicting response[0]
            picked = logits[row, start : start + len(response)].float().log_softmax(dim=-1)
            target = torch.tensor(list(response), dtype=torch.long, device=picked.device)
            out[row] = picked.gather(-1, target[:, None]).squeeze(-1).tolist()
        return out


def build_search(model: nn.Module, tokenizer: Any, verifier: Any, config: PTSConfig | None = None, *,
                 policy_id: str | None = None, cache_dir: Any = None, stop_ids: Iterable[int] | None = None,
                 max_logprob_tokens: int = 4096, progress: Any = None) -> PivotalTokenSearch:
    """A :class:`PivotalTokenSearch` over ``model`` (eval, built with ``max_seq_len`` >= the
    longest question + ``config.max_new_tokens``). ``policy_id`` names the weights in the cache
    (default: the sha256 of its weights); ``cache_dir`` (e.g. ``<stage>/data``) holds ``pts-cache.jsonl``."""
    config = config or PTSConfig()
    estimator = ModelEstimator(model, tokenizer, verifier, stop_ids=stop_ids, max_rows=config.max_rows)
    logprobs = ModelLogProbs(model, max_tokens=max_logprob_tokens)
    # Under --nproc every rank runs the same search on the same cache contents (read here, before
    # anyone writes: the barrier); rank 0 alone appends what the ranks compute together.
    cache = None if cache_dir is None else PTSCache(cache_dir, write=ranks.is_main())
    ranks.barrier()
    return PivotalTokenSearch(estimator, logprobs, config, policy_id=policy_id or weights_sha256(model), cache=cache,
                              progress=progress)
