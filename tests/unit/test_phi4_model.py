"""The Phi-4 ModelSpec: the paper's 14B shape (FACTS.md §1), plain RoPE, CPU flavors, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from phi4_engine.titan import phi4

PHI4_VOCAB = 100352
PHI4_THETA = 250000.0
SMALL_VOCAB = 512


def _build(flavor: str, *, vocab_size: int = SMALL_VOCAB, max_seq_len: int = 64, seed: int = 0):
    config = phi4.build_model_config(
        phi4.FLAVORS[flavor], vocab_size=vocab_size, rope_theta=PHI4_THETA, max_seq_len=max_seq_len
    )
    torch.manual_seed(seed)
    model = config.build()
    model.init_states()
    return model.eval()


@pytest.fixture(scope="module")
def phi4_14b():
    spec = phi4.model_spec("14b", vocab_size=PHI4_VOCAB, rope_theta=PHI4_THETA, max_seq_len=4096)
    with torch.device("meta"):
        model = spec.model.build()
    return spec, model


def test_14b_parameter_count(phi4_14b):
    _, model = phi4_14b
    assert sum(p.numel() for p in model.parameters()) == 14_659_507_200


def test_14b_shapes(phi4_14b):
    spec, model = phi4_14b
    shape = phi4.FLAVORS["14b"]
    assert (shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads) == (5120, 40, 40, 10)
    assert shape.hidden_dim == 17920
    assert len(model.layers) == 40
    assert model.tok_embeddings.weight.shape == (PHI4_VOCAB, 5120)
    assert model.lm_head.weight.shape == (PHI4_VOCAB, 5120)
    for layer in model.layers.values():
        attention = layer.attention
        assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (40, 10, 128)
        assert attention.qkv_linear.wq.weight.shape == (40 * 128, 5120)
        assert attention.qkv_linear.wk.weight.shape == (10 * 128, 5120)
        assert attention.qkv_linear.wv.weight.shape == (10 * 128, 5120)
        assert attention.wo.weight.shape == (5120, 5120)
        assert layer.feed_forward.w1.weight.shape == (17920, 5120)
        assert layer.feed_forward.w3.weight.shape == (17920, 5120)
        assert layer.feed_forward.w2.weight.shape == (5120, 17920)


def test_14b_has_no_biases(phi4_14b):
    _, model = phi4_14b
    assert [name for name, _ in model.named_parameters() if "bias" in name] == []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.bias is None, name


def test_14b_lm_head_is_not_tied(phi4_14b):
    spec, model = phi4_14b
    assert spec.model.enable_weight_tying is False
    assert model.lm_head.weight is not model.tok_embeddings.weight


def test_14b_rmsnorm_eps(phi4_14b):
    _, model = phi4_14b
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * 40 + 1
    assert {m.eps for m in norms} == {1e-5}


def test_attention_backend_defaults_to_sdpa():
    from torchtitan.models.common.attention import FlexAttention

    from phi4_engine.titan.attention import DocumentSDPA

    config = phi4.build_model_config(
        phi4.FLAVORS["debug"], vocab_size=SMALL_VOCAB, rope_theta=PHI4_THETA, max_seq_len=64
    )
    # "sdpa" = SDPA with optional block-causal document masks (tests/unit/test_doc_masking.py)
    assert isinstance(config.layers[0].attention.inner_attention, DocumentSDPA.Config)
    assert isinstance(phi4.inner_attention_config("flex"), FlexAttention.Config)
    with pytest.raises(ValueError):
        phi4.inner_attention_config("eager")


def test_rope_is_unscaled_with_the_given_theta():
    max_seq_len = 64
    config = phi4.build_model_config(
        phi4.FLAVORS["debug"],
        vocab_size=SMALL_VOCAB,
        rope_theta=PHI4_THETA,
        max_seq_len=max_seq_len,
    )
    rope_config = config.layers[0].attention.rope
    assert rope_config.scaling == "none"
    assert rope_config.theta == PHI4_THETA

    model = _build("debug", max_seq_len=max_seq_len)
    head_dim = phi4.FLAVORS["debug"].dim // phi4.FLAVORS["debug"].n_heads
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = 1.0 / PHI4_THETA ** (2 * i / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    expected = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    for layer in model.layers.values():
        cache = layer.attention.rope.cache
        assert cache.shape == (max_seq_len, head_dim // 2)
        torch.testing.assert_close(cache, expected, atol=1e-5, rtol=0)
    # Llama-3.1 scaling would divide the lowest frequency by 8; ours is untouched.
    lowest = model.layers["0"].attention.rope.cache[1, -1].angle().item()
    assert math.isclose(lowest, inv_freq[-1].item(), rel_tol=1e-5)


@pytest.mark.parametrize("flavor", ["tiny", "debug"])
def test_small_flavors_forward_on_cpu(flavor):
    model = _build(flavor)
    tokens = torch.randint(0, SMALL_VOCAB, (2, 32))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 32, SMALL_VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("flavor", ["tiny", "debug"])
def test_causality(flavor):
    model = _build(flavor)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SMALL_VOCAB, (2, 32), generator=generator)
    changed = tokens.clone()
    t = 20
    changed[:, t + 1 :] = torch.randint(0, SMALL_VOCAB, (2, 32 - t - 1), generator=generator)
    assert not torch.equal(tokens, changed)
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], atol=1e-6, rtol=0)
    # and the change is visible after t, so the check above is not vacuous
    assert (before[:, t + 1 :] - after[:, t + 1 :]).abs().max() > 1e-3
