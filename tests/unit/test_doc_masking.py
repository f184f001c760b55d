"""Packed documents: per-document positions and block-causal attention (CPU, fp32).

The property that matters: a token's logits do not depend on the other documents packed in its
row. Plus: one document = plain causal attention, gradients flow, a torchtitan training run on
packed batches learns, and torchtitan's FlexAttention document mask (the CUDA path) agrees.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phi4_engine.data.positions import document_positions
from phi4_engine.titan import attention, phi4
from phi4_engine.titan.attention import DocumentSDPA, block_causal_mask

VOCAB = 512
EOS = 3
THETA = 10000.0


def _model(flavor: str = "debug", *, max_seq_len: int = 64, backend: str = "sdpa", seed: int = 0):
    config = phi4.build_model_config(
        phi4.FLAVORS[flavor],
        vocab_size=VOCAB,
        rope_theta=THETA,
        max_seq_len=max_seq_len,
        attention=backend,
    )
    torch.manual_seed(seed)
    model = config.build()
    model.init_states()
    return config, model.eval()


def _forward(config, model, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Run the model the way Phi4Trainer does: masks added by prepare_attention_inputs."""
    batch = {"input": tokens} if positions is None else {"input": tokens, "positions": positions}
    batch = attention.prepare_attention_inputs(config, batch)
    return model(batch.pop("input"), **batch)


def _doc(generator: torch.Generator, length: int, low: int = 4, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (length,), generator=generator)


def _pack(*docs: torch.Tensor) -> torch.Tensor:
    """docs joined by EOS: [d0 EOS d1 EOS ... d_last] (no EOS after the last)."""
    parts = []
    for i, doc in enumerate(docs):
        parts.append(doc)
        if i < len(docs) - 1:
            parts.append(torch.tensor([EOS]))
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# document_positions (torch only; the data layer calls it)
# --------------------------------------------------------------------------------------------


def test_positions_restart_after_each_eos():
    E = EOS
    tokens = torch.tensor([[5, 6, E, 7, 8, 9, E, 10]])
    assert document_positions(tokens, E).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([5, 6, 7, 8], [0, 1, 2, 3]),  # no EOS: one document
        ([EOS, 5, 6, 7], [0, 0, 1, 2]),  # EOS at 0: a one-token document, then a new one
        ([5, 6, 7, EOS], [0, 1, 2, 3]),  # EOS at the end: the next document starts next row
        ([5, EOS, EOS, 6], [0, 1, 0, 0]),  # EOS EOS: the second is a document of its own
        ([EOS, EOS, EOS], [0, 0, 0]),
        ([EOS], [0]),
    ],
)
def test_positions_edge_cases(row, expected):
    assert document_positions(torch.tensor([row]), EOS).tolist() == [expected]
    assert document_positions(torch.tensor(row), EOS).tolist() == expected  # 1-D input


def test_positions_are_per_row_long_and_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (5, 40), generator=generator)  # EOS = 3 is frequent
    positions = document_positions(tokens, EOS)
    assert positions.dtype == torch.long and positions.shape == tokens.shape
    for row, out in zip(tokens.tolist(), positions.tolist()):
        expected, p = [], 0
        for i, _ in enumerate(row):
            p = 0 if i == 0 or row[i - 1] == EOS else p + 1
            expected.append(p)
        assert out == expected


def test_positions_reject_bad_input():
    with pytest.raises(TypeError):
        document_positions(torch.zeros(2, 3), EOS)
    with pytest.raises(ValueError):
        document_positions(torch.zeros(2, 3, 4, dtype=torch.long), EOS)
    assert document_positions(torch.zeros(2, 0, dtype=torch.long), EOS).shape == (2, 0)


def test_positions_module_does_not_import_torchtitan():
    import ast
    from pathlib import Path

    import phi4_engine.data.positions as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.split(".")[0] == "torchtitan"]


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def test_block_causal_mask_is_causal_and_same_document():
    positions = document_positions(torch.tensor([[5, 6, EOS, 7, EOS, 8], [5, 6, 7, 8, 9, 10]]), EOS)
    mask = block_causal_mask(positions)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    docs = [[0, 0, 0, 1, 1, 2], [0] * 6]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, 0, i, j].item() == (j <= i and docs[b][i] == docs[b][j])
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_single_document_rows_take_the_causal_fast_path():
    arange = torch.arange(8).expand(3, 8)
    assert attention.attention_masks_from_positions(arange) is None
    assert attention.attention_masks_from_positions(None) is None
    two_docs = document_positions(torch.tensor([[5, EOS, 6, 7]]), EOS)
    masks = attention.attention_masks_from_positions(two_docs)
    assert masks is not None and torch.equal(masks, block_causal_mask(two_docs))


def test_flex_document_mask_matches_ours():
    """torchtitan's Flex path (CUDA) masks documents from positions with the same semantics:
    its mask_mods (Decoder._create_flex_attention_mask_for_document) evaluated densely."""
    from torch.nn.attention.flex_attention import and_masks
    from torchtitan.models.common.attention import (
        get_causal_mask_mod,
        get_efficient_causal_mask_mod_for_packed_document,
    )

    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # torchtitan has separate B == 1 and B > 1 code paths
        tokens = torch.randint(0, 8, (batch, 48), generator=generator)
        tokens[0, 0] = EOS
        positions = document_positions(tokens, EOS)
        mask_mod = and_masks(
            get_causal_mask_mod(), get_efficient_causal_mask_mod_for_packed_document(positions)
        )
        b = torch.arange(batch).view(-1, 1, 1)
        q = torch.arange(48).view(1, -1, 1)
        kv = torch.arange(48).view(1, 1, -1)
        flex_dense = mask_mod(b, torch.tensor(0), q, kv).expand(batch, 48, 48)
        assert torch.equal(flex_dense, block_causal_mask(positions)[:, 0])


# --------------------------------------------------------------------------------------------
# DocumentSDPA
# --------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, mask):
    """Plain softmax attention with KV heads repeated (GQA), [B, L, N, H] in and out;
    ``mask`` [B, 1, L, L] broadcasts over heads."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bnqk,bknh->bqnh", scores.softmax(-1), v)


def test_document_sdpa_with_gqa_matches_reference():
    generator = torch.Generator().manual_seed(2)
    B, L, N, KV, H = 2, 24, 8, 2, 16
    q = torch.randn(B, L, N, H, generator=generator)
    k = torch.randn(B, L, KV, H, generator=generator)
    v = torch.randn(B, L, KV, H, generator=generator)
    positions = document_positions(torch.randint(0, 6, (B, L), generator=generator), EOS)
    mask = block_causal_mask(positions)
    out = DocumentSDPA.Config().build()(q, k, v, attention_masks=mask, enable_gqa=True)
    assert out.shape == (B, L, N, H)
    torch.testing.assert_close(out, _reference_attention(q, k, v, mask), atol=1e-5, rtol=0)


def test_document_sdpa_without_masks_is_torchtitans_causal_sdpa():
    from torchtitan.models.common.attention import ScaledDotProductAttention

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 20, 4, 8, generator=generator)
    k = torch.randn(2, 20, 1, 8, generator=generator)
    v = torch.randn(2, 20, 1, 8, generator=generator)
    ours = DocumentSDPA.Config().build()(q, k, v, attention_masks=None, enable_gqa=True)
    theirs = ScaledDotProductAttention.Config().build()
    theirs = theirs(q, k, v, attention_masks=None, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_document_sdpa_rejects_foreign_masks():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="bool tensor"):
        DocumentSDPA.Config().build()(x, x, x, attention_masks=torch.zeros(1, 1, 4, 4))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["debug", "tiny"])
def test_logits_do_not_depend_on_the_other_documents_in_the_pack(flavor):
    """[A EOS B EOS C] vs [A' EOS B EOS C'] (other lengths, other content) vs [B EOS] alone:
    every token of B (and its EOS) gets the same logits."""
    config, model = _model(flavor)
    generator = torch.Generator().manual_seed(4)
    doc_b = _doc(generator, 10)
    pack_1 = _pack(_doc(generator, 7), doc_b, _doc(generator, 12))
    pack_2 = _pack(_doc(generator, 3), doc_b, _doc(generator, 16))
    assert pack_1.shape == pack_2.shape == (31,)
    span_1, span_2 = slice(8, 19), slice(4, 15)  # B and its EOS in each pack
    assert torch.equal(pack_1[span_1], pack_2[span_2])
    alone = torch.cat([doc_b, torch.tensor([EOS])]).unsqueeze(0)

    tokens = torch.stack([pack_1, pack_2])  # one batch, different masks per row
    positions = document_positions(tokens, EOS)
    assert positions[0, span_1].tolist() == positions[1, span_2].tolist() == list(range(11))
    with torch.no_grad():
        logits = _forward(config, model, tokens, positions)
        logits_alone = _forward(config, model, alone, document_positions(alone, EOS))
        unmasked = model(tokens)  # plain causal attention: B sees A

    torch.testing.assert_close(logits[0, span_1], logits[1, span_2], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0, span_1], logits_alone[0], atol=1e-5, rtol=0)
    # Not vacuous: without document masking B's logits depend on what precedes it.
    assert (unmasked[0, span_1] - unmasked[1, span_2]).abs().max() > 1e-3


def test_one_document_per_row_equals_plain_causal_attention():
    config, model = _model("tiny")
    tokens = torch.randint(4, VOCAB, (3, 32), generator=torch.Generator().manual_seed(5))
    arange = torch.arange(32).expand(3, 32)
    mask = block_causal_mask(arange)
    with torch.no_grad():
        plain = model(tokens)
        via_trainer_path = _forward(config, model, tokens, arange)
        explicit_mask = model(tokens, positions=arange, attention_masks=mask)
    torch.testing.assert_close(via_trainer_path, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(explicit_mask, plain, atol=1e-5, rtol=0)


def test_gradients_flow_and_stay_inside_the_document():
    """Backward runs on CPU; the loss on B's tokens sends no gradient to A's or C's tokens."""
    config, model = _model("debug")
    model.train()
    generator = torch.Generator().manual_seed(6)
    # A, B, C use disjoint token ids, so each embedding row belongs to one document.
    doc_a = _doc(generator, 9, 100, 200)
    doc_b = _doc(generator, 8, 200, 300)
    doc_c = _doc(generator, 6, 300, 400)
    tokens = _pack(doc_a, doc_b, doc_c).unsqueeze(0)
    positions = document_positions(tokens, EOS)
    logits = _forward(config, model, tokens, positions)
    b_span = slice(10, 18)
    loss = F.cross_entropy(logits[0, b_span], torch.randint(0, VOCAB, (8,), generator=generator))
    loss.backward()
    grad = model.tok_embeddings.weight.grad
    assert torch.isfinite(grad).all()
    assert grad[doc_b].abs().sum() > 0
    assert grad[doc_a].abs().max() == 0 and grad[doc_c].abs().max() == 0
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # every attention projection (incl. the shared GQA K/V heads) gets a gradient
    for layer in model.layers.values():
        qkv = layer.attention.qkv_linear
        for w in (qkv.wq, qkv.wk, qkv.wv):
            assert w.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_flex_backend_gives_the_same_logits():
    """The CUDA backend, run forward-only on CPU (compiled flex: ~40 s on 2 cores)."""
    config, model = _model("debug", max_seq_len=128)
    _, flex_model = _model("debug", max_seq_len=128, backend="flex")
    flex_model.load_state_dict(model.state_dict())
    tokens = torch.randint(4, VOCAB, (2, 128), generator=torch.Generator().manual_seed(7))
    tokens[0, [10, 50, 51, 90]] = EOS
    tokens[1, [0, 64, 127]] = EOS
    positions = document_positions(tokens, EOS)
    with torch.no_grad():
        ours = _forward(config, model, tokens, positions)
        # what torchtitan's Trainer.post_dataloading_process does for Flex
        block_mask = flex_model.get_attention_masks(positions=positions)
        flex = flex_model(tokens, positions=positions, attention_masks=block_mask)
        plain = model(tokens, positions=positions)
    torch.testing.assert_close(flex, ours, atol=1e-5, rtol=0)
    assert (plain - ours).abs().max() > 1e-3


def test_flex_gets_causal_positions_when_the_loader_has_none():
    flex_config = phi4.build_model_config(
        phi4.FLAVORS["debug"], vocab_size=VOCAB, rope_theta=THETA, max_seq_len=16, attention="flex"
    )
    tokens = torch.zeros(2, 16, dtype=torch.long)
    batch = attention.prepare_attention_inputs(flex_config, {"input": tokens})
    assert torch.equal(batch["positions"], torch.arange(16).expand(2, 16))
    assert "attention_masks" not in batch  # torchtitan's Trainer builds Flex's BlockMask


# --------------------------------------------------------------------------------------------
# a torchtitan training run on packed batches
# --------------------------------------------------------------------------------------------


class _Tokenizer:
    eos_id = EOS
    vocab_size = VOCAB

    def encode(self, text):
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _PackedLoader:
    """Counting runs (s, s+1, ...) of random length joined by EOS, packed into rows of seq_len
    with per-document positions: learnable, and every row holds several documents."""

    def __init__(self, dp_rank, dp_world_size, seq_len, batch_size):
        self.seq_len, self.batch_size, self.step = seq_len, batch_size, 0

    def _row(self, generator):
        out = []
        while len(out) < self.seq_len + 1:
            start = int(torch.randint(4, 200, (1,), generator=generator))
            length = int(torch.randint(3, 20, (1,), generator=generator))
            out += list(range(start, start + length)) + [EOS]
        return out[: self.seq_len + 1]

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.step)
            self.step += 1
            rows = torch.tensor([self._row(generator) for _ in range(self.batch_size)])
            inputs, labels = rows[:, :-1], rows[:, 1:]
            yield {"input": inputs, "positions": document_positions(inputs, EOS)}, labels

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def test_training_run_on_packed_batches(tmp_path, monkeypatch):
    from phi4_engine.titan.trainer import LMJob, run_lm

    seen_masks = []
    forward = DocumentSDPA.forward

    def spy(self, q_BLNH, k_BLNH, v_BLNH, **kwargs):  # names: torchtitan's TP local_map keys
        seen_masks.append(kwargs.get("attention_masks"))
        return forward(self, q_BLNH, k_BLNH, v_BLNH, **kwargs)

    monkeypatch.setattr(DocumentSDPA, "forward", spy)
    losses: list[float] = []
    result = run_lm(
        LMJob(
            dump_folder=str(tmp_path / "run"),
            flavor="debug",
            vocab_size=VOCAB,
            rope_theta=THETA,
            seq_len=64,
            steps=30,
            batch_size=4,
            lr=3e-3,
            warmup_steps=2,
            make_loader=_PackedLoader,
            tokenizer=_Tokenizer(),
            checkpoint_interval=30,
            on_step=lambda step, metrics: losses.append(metrics["loss"]),
        )
    )
    assert result.step == 30 and len(losses) == 30
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(VOCAB)) < 1.0  # starts near uniform
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    # the trainer built block-causal masks from the loader's positions for every layer call
    assert seen_masks and all(m is not None and m.shape == (4, 1, 64, 64) for m in seen_masks)
