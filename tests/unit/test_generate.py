"""Batched KV-cache generation on the Phi-4 torchtitan model (phi4_engine.titan.generate)."""

from __future__ import annotations

import json

import pytest
import torch

from phi4_engine.engine import Engine
from phi4_engine.titan import phi4
from phi4_engine.titan.generate import CachedDecoder, Completion, Generator, load_model
from phi4_engine.titan.trainer import weights_sha256
from phi4_engine.tokenizer import build_phi4_mini
from tests.conftest import tiny_pretrain_spec

VOCAB = 512
PAD = 0


def _model(flavor: str = "debug", *, vocab_size: int = VOCAB, max_seq_len: int = 96, seed: int = 0):
    spec = phi4.model_spec(flavor, vocab_size=vocab_size, rope_theta=10000.0, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = spec.model.build()
    with torch.no_grad():
        model.init_states()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _model("debug")


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, eos_ids=set(), pad_id=PAD)


def _prompts(lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("flavor", ["debug", "tiny"])
def test_cached_forward_matches_full_forward_at_every_position(flavor):
    """Left-padded prefill, then a 3-token chunk, then single tokens: every real position's
    logits equal the model's own forward over that sequence alone."""
    seqs = [torch.tensor(s) for s in _prompts([23, 14, 8])]
    tail = 6  # fed after the prefill: 3 as one chunk, then 1, 1, 1
    heads = [len(s) - tail for s in seqs]
    width = max(heads)
    model = _model(flavor)
    decoder = CachedDecoder(model)
    cache = decoder.new_cache(len(seqs), width + tail, torch.tensor([width - n for n in heads]))
    prefill = torch.full((len(seqs), width), PAD)
    for row, (s, n) in enumerate(zip(seqs, heads)):
        prefill[row, width - n :] = s[:n]
    chunks = [decoder(prefill, cache)]
    chunks.append(decoder(torch.stack([s[n : n + 3] for s, n in zip(seqs, heads)]), cache))
    for j in range(3, tail):
        chunks.append(decoder(torch.stack([s[n + j : n + j + 1] for s, n in zip(seqs, heads)]), cache))
    cached = torch.cat(chunks, dim=1)
    with torch.no_grad():
        for row, (s, n) in enumerate(zip(seqs, heads)):
            full = model(s[None])[0]
            torch.testing.assert_close(cached[row, width - n :], full, atol=1e-4, rtol=0)


def test_greedy_matches_uncached_argmax_loop(model, generator):
    prompts = _prompts([9, 17])
    ours = generator.generate(prompts, max_new_tokens=8)
    with torch.no_grad():
        for prompt, got in zip(prompts, ours):
            seq = torch.tensor([prompt])
            for _ in range(8):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert seq[0, len(prompt) :].tolist() == got


def test_greedy_is_independent_of_batch_composition(generator):
    prompts = _prompts([5, 19, 11, 2])
    batched = generator.generate(prompts, max_new_tokens=16)
    alone = [generator.generate([p], max_new_tokens=16)[0] for p in prompts]
    assert batched == alone
    reordered = generator.generate(prompts[::-1] + _prompts([30], seed=7), max_new_tokens=16)
    assert reordered[:4] == batched[::-1]


def test_max_new_tokens_is_respected(generator):
    prompts = _prompts([4, 10, 7])
    for n in (1, 5, 13):
        completions = generator.generate_completions(prompts, max_new_tokens=n)
        assert [len(c.tokens) for c in completions] == [n] * 3
        assert {c.finish_reason for c in completions} == {"length"}
    assert generator.generate(prompts, max_new_tokens=0) == [[], [], []]
    assert generator.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="max_seq_len"):
        generator.generate(prompts, max_new_tokens=90)  # 10 + 90 > 96
    with pytest.raises(ValueError, match="at least one token"):
        generator.generate([[]], max_new_tokens=2)


def test_each_row_stops_at_its_own_eos(model, generator):
    prompts = _prompts([6, 15, 9])
    free = generator.generate(prompts, max_new_tokens=20)
    # Stop id: a token row 0 first produces at step >= 2 that some other row never produces.
    stop_at = next(
        i for i in range(2, 20)
        if free[0][i] not in free[0][:i] and any(free[0][i] not in other for other in free[1:])
    )
    eos = free[0][stop_at]
    completions = Generator(model, eos_ids={eos}, pad_id=PAD).generate_completions(prompts, max_new_tokens=20)
    for row, c in zip(free, completions):
        if eos in row:
            cut = row.index(eos)
            assert c == Completion(row[:cut], "stop", eos)  # stop id excluded, reported
        else:
            assert c == Completion(row, "length", None)
    assert completions[0].tokens == free[0][:stop_at]
    assert any(c.finish_reason == "length" for c in completions)  # and the others run on
    # A per-call stop set overrides the generator's.
    assert generator.generate(prompts, max_new_tokens=20, eos_ids={eos})[0] == free[0][:stop_at]


def test_sampling_is_deterministic_under_a_seed(generator):
    prompts = _prompts([7, 12])
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = generator.generate(prompts, seed=3, **kwargs)
    assert generator.generate(prompts, seed=3, **kwargs) == a
    assert generator.generate(prompts, seed=4, **kwargs) != a
    assert generator.generate(prompts, seed=3, max_new_tokens=16, temperature=1.0) != a  # top_p matters
    # A nucleus that holds only the top token is greedy.
    greedy = generator.generate(prompts, max_new_tokens=16)
    assert generator.generate(prompts, seed=5, max_new_tokens=16, temperature=0.7, top_p=1e-6) == greedy
    with pytest.raises(ValueError, match="top_p"):
        generator.generate(prompts, max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_generate_text_renders_chat_and_stops_at_im_end():
    tokenizer = build_phi4_mini(2048)
    model = _model(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    generator = Generator(model, eos_ids={tokenizer.eos_id}, pad_id=tokenizer.pad_id)
    chats = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"}]]
    texts = generator.generate_text(tokenizer, chats, max_new_tokens=8)
    prompts = [tokenizer.encode_chat(c, add_generation_prompt=True)[0] for c in chats]
    assert prompts[0][-1] == tokenizer.im_sep_id
    expected = generator.generate(prompts, max_new_tokens=8, eos_ids={tokenizer.eos_id, tokenizer.im_end_id})
    assert texts == [tokenizer.decode(ids) for ids in expected]
    # Make <|im_end|> the argmax: the reply is then empty, not "<|im_end|>".
    bump = torch.zeros(tokenizer.vocab_size)
    bump[tokenizer.im_end_id] = 1e4
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + bump)
    try:
        assert generator.generate_text(tokenizer, chats, max_new_tokens=8) == ["", ""]
    finally:
        handle.remove()


def test_load_model_from_a_trained_dcp_checkpoint(tmp_path):
    result = Engine(tiny_pretrain_spec(steps=5), run_dir=tmp_path / "run").run()
    assert result.stages["pretrain"].status == "done"
    entry = json.loads((tmp_path / "run" / "ledger.json").read_text())["stages"]["pretrain"]
    vocab = build_phi4_mini(2048).vocab_size
    model = load_model(entry["final_checkpoint"], flavor="debug", vocab_size=vocab, rope_theta=10000.0, max_seq_len=128)
    assert weights_sha256(model) == entry["weights_sha256"]
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    rope = model.layers["0"].attention.rope.cache  # not in checkpoints: rebuilt, still complex
    assert rope.is_complex() and rope.shape[0] == 128
    torch.testing.assert_close(rope, _model(vocab_size=vocab, max_seq_len=128).layers["0"].attention.rope.cache)
    # The stage folder resolves to its newest committed step, and a wrong flavor is a clear error.
    again = load_model(str(tmp_path / "run" / "pretrain" / "checkpoints"), flavor="debug", vocab_size=vocab,
                       rope_theta=10000.0, max_seq_len=128)
    assert weights_sha256(again) == entry["weights_sha256"]
    from phi4_engine.errors import EngineError

    with pytest.raises(EngineError, match="wrong flavor"):
        load_model(entry["final_checkpoint"], flavor="tiny", vocab_size=vocab, rope_theta=10000.0, max_seq_len=128)
    # The loaded model generates (a trained checkpoint, end to end).
    out = Generator(model, eos_ids=set(), pad_id=0).generate([[1, 2, 3], [4]], max_new_tokens=5)
    assert [len(o) for o in out] == [5, 5]


class _Tok:
    """Just what greedy_answers uses, within the test model's vocabulary."""

    im_end_id, eos_id, pad_id = 510, 511, PAD

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1 + ord(c) % 500 for m in messages for c in m["content"]], None

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_evaluations_of_one_model_share_their_greedy_answers(model, monkeypatch):
    from phi4_engine.plugins.evaluations import greedy_answers

    calls = []
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    first = greedy_answers(model, _Tok(), chats, max_new_tokens=4)
    again = greedy_answers(model, _Tok(), chats, max_new_tokens=4)
    longer = greedy_answers(model, _Tok(), chats, max_new_tokens=6)
    assert first == again and len(calls) == 2  # the second evaluation decoded nothing; another length did
    assert all(a and b.startswith(a) for a, b in zip(first, longer))
