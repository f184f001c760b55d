"""Fast DPO layouts (phi4_engine.titan.dpo_layouts): shared prompts, pivotal pairs scored from one
row, packing, LM head at scored positions only. They must give the plain layout's per-row
log-probs, gradients and training losses (fp32 tolerance), and the trainer and the reference
precompute must pick them by themselves.
"""

from __future__ import annotations

import random

import pytest
import torch

from phi4_engine.titan import dpo, dpo_layouts, phi4
from phi4_engine.titan.dpo import (
    DPOJob,
    PreferencePair,
    compute_reference_logps,
    encode_pairs,
    logps_from_logits,
    pairs_loader,
    run_dpo,
    sequence_logps,
)
from phi4_engine.titan.generate import save_weights
from phi4_engine.titan.dpo_layouts import REJECTED_TAIL, pack_pairs, packed_logps

VOCAB = 128
SEQ = 48
THETA = 10000.0
PAD = 0
TOL = 1e-4  # summed fp32 log-probs of up to ~40 tokens, different matmul shapes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = phi4.model_spec("debug", vocab_size=VOCAB, rope_theta=THETA, max_seq_len=SEQ).model.build()
    with torch.no_grad():
        m.init_states()
    return m


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("init") / "step-0"
    save_weights(model.state_dict(), str(folder))
    return str(folder)


def _ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(10, VOCAB) for _ in range(rng.randint(lo, hi))]


def judge_pairs(n: int = 6, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [PreferencePair(_ids(rng, 3, 12), _ids(rng, 2, 14), _ids(rng, 2, 14)) for _ in range(n)]


def pivotal_pairs(n: int = 6, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [PreferencePair(_ids(rng, 5, 30), [7], [9]) for _ in range(n)]


def mixed_pairs() -> list[PreferencePair]:
    """Every case at once: identical pair, shared first response tokens, score_first, one row a
    prefix of the other, pivotal, plain judge-style."""
    rng = random.Random(3)
    return [
        PreferencePair([11, 12, 13], [20, 21, 22], [20, 21, 22]),
        PreferencePair([11, 12, 13, 14], [30, 31, 32, 33], [30, 31, 40]),
        PreferencePair(_ids(rng, 4, 9), _ids(rng, 8, 12), _ids(rng, 8, 12), score_first=3),
        PreferencePair([15, 16, 17], [50, 51], [50, 51, 52, 53]),
        PreferencePair(_ids(rng, 6, 20), [7], [9]),
        PreferencePair(_ids(rng, 3, 10), _ids(rng, 1, 10), _ids(rng, 1, 10)),
    ]


def _plain_logps(model, batch):
    logits = model(batch["input"])
    return logps_from_logits(logits, batch["input"], batch["loss_mask"])


LAYOUT_OPTIONS = [
    dict(),
    dict(pack=False),
    dict(share_prompt=False),
    dict(share_prompt=False, pack=False),
    dict(custom_masks=False),
]


@pytest.mark.parametrize("pairs", [judge_pairs(), pivotal_pairs(), mixed_pairs()], ids=["judge", "pivotal", "mixed"])
@pytest.mark.parametrize("options", LAYOUT_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "auto")
def test_layouts_give_the_plain_log_probs_and_gradients(model, pairs, options):
    batch = encode_pairs(pairs, SEQ, PAD)
    model.zero_grad()
    plain, plain_counts = _plain_logps(model, batch)
    weights = torch.linspace(0.5, 1.5, plain.numel())
    (plain * weights).sum().backward()
    plain_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    packed = pack_pairs(batch["input"], batch["loss_mask"], **options)
    fast, counts = packed_logps(model, packed)
    (fast * weights).sum().backward()
    assert torch.equal(counts, plain_counts)
    assert torch.allclose(fast, plain, atol=TOL, rtol=0), (fast - plain).abs().max()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain_grads[name], atol=1e-5, rtol=1e-4), name
    model.zero_grad()


def test_pivotal_pairs_score_both_tokens_from_one_prompt_row(model):
    """One forward row per pair = the prompt, both tokens read from its last position; no mask."""
    pairs = pivotal_pairs(n=4)
    batch = encode_pairs(pairs, SEQ, PAD)
    packed = pack_pairs(batch["input"], batch["loss_mask"])
    assert packed.layout.startswith("shared") and packed.tokens.shape[0] <= len(pairs)
    longest = max(len(p.prompt) for p in pairs)
    assert packed.tokens.shape[1] == longest
    if packed.tokens.shape[0] == len(pairs):  # nothing packed: plain causal rows = the prompts
        assert not packed.needs_mask
        for row, pair in zip(packed.tokens.tolist(), pairs):
            assert row[: len(pair.prompt)] == list(pair.prompt)
    chosen = packed.hidden_index[packed.owner < len(pairs)]
    rejected = packed.hidden_index[packed.owner >= len(pairs)]
    assert torch.equal(chosen, rejected)  # the same logits position scores both tokens
    # the same on the mask-free path (Flex/Varlen): still one row per pair
    flex = pack_pairs(batch["input"], batch["loss_mask"], custom_masks=False)
    assert flex.tokens.shape == (len(pairs), longest) and not flex.needs_mask


def test_judge_pairs_share_the_prompt_and_stop_at_the_last_scored_token(model):
    pairs = judge_pairs(n=4)
    batch = encode_pairs(pairs, SEQ, PAD)
    packed = pack_pairs(batch["input"], batch["loss_mask"], pack=False)
    assert packed.layout == "fork" and packed.tokens.shape[0] == len(pairs) and packed.needs_mask
    for k, p in enumerate(pairs):
        s = len(p.prompt)  # random responses: the shared prefix is the prompt
        block = list(p.prompt) + list(p.chosen[:-1]) + list(p.rejected[:-1])
        assert packed.tokens[k, : len(block)].tolist() == block
        expected = list(range(s + len(p.chosen) - 1)) + list(range(s, s + len(p.rejected) - 1))
        assert packed.positions[k, : len(block)].tolist() == expected
    masks = packed.masks()
    first = pairs[0]
    c0, r0 = len(first.prompt), len(first.prompt) + len(first.chosen) - 1
    assert masks[0, 0, r0, : len(first.prompt)].all()  # rejected sees the prompt
    assert not masks[0, 0, r0, c0:r0].any()  # ... but not the chosen tail
    # Flex/Varlen: no forked tails (each row its own block), still no padding to seq_len
    flex = pack_pairs(batch["input"], batch["loss_mask"], custom_masks=False)
    assert not (flex.branch == REJECTED_TAIL).any() and not flex.needs_mask
    assert flex.tokens.shape[1] < SEQ


def test_score_first_cuts_the_row():
    pair = PreferencePair([11, 12, 13], [20, 21, 22, 23, 24, 25], [30, 31, 32, 33, 34], score_first=2)
    batch = encode_pairs([pair], SEQ, PAD)
    packed = pack_pairs(batch["input"], batch["loss_mask"])
    assert packed.tokens.shape == (1, 5)  # prompt + 1 chosen + 1 rejected token
    assert packed.tokens[0].tolist() == [11, 12, 13, 20, 30]
    assert packed.targets.tolist() == [20, 21, 30, 31]


def test_packing_fills_rows_and_masks_blocks(model):
    pairs = [PreferencePair([11] * 20, [5, 7], [5, 9])] + [PreferencePair([12, 13], [14, 15], [16, 17])] * 3
    batch = encode_pairs(pairs, SEQ, PAD)
    packed = pack_pairs(batch["input"], batch["loss_mask"])
    assert packed.layout == "fork+packed" and packed.tokens.shape[0] < len(pairs)
    plain, _ = _plain_logps(model, batch)
    with torch.no_grad():
        fast, _ = packed_logps(model, packed)
    assert torch.allclose(fast, plain.detach(), atol=TOL, rtol=0)


def test_sequence_logps_uses_the_fast_layout_unless_rows_are_packed_documents(model, monkeypatch):
    pairs = mixed_pairs()
    batch = encode_pairs(pairs, SEQ, PAD)
    calls: list[str] = []
    real = dpo.pack_pairs
    monkeypatch.setattr(dpo, "pack_pairs", lambda *a, **k: calls.append("packed") or real(*a, **k))
    with torch.no_grad():
        auto = sequence_logps(model, batch["input"], batch["loss_mask"], batch["positions"])
        plain = sequence_logps(model, batch["input"], batch["loss_mask"], layout="plain")
        odd = sequence_logps(model, batch["input"][:5], batch["loss_mask"][:5])  # not a pair batch
        # rows that already hold several documents are scored as given (block-causal)
        packed_docs = batch["positions"].clone()
        packed_docs[:, SEQ // 2 :] = torch.arange(SEQ - SEQ // 2)
        given = sequence_logps(model, batch["input"], batch["loss_mask"], packed_docs)
    assert calls == ["packed", "packed"]
    assert torch.allclose(auto, plain, atol=TOL, rtol=0)
    assert torch.allclose(odd, plain[:5], atol=TOL, rtol=0)
    assert given.shape == plain.shape


def test_reference_precompute_uses_the_fast_layout(init_checkpoint, model, monkeypatch):
    pairs = mixed_pairs() + pivotal_pairs(n=3)
    calls: list[str] = []
    real = dpo.pack_pairs
    monkeypatch.setattr(dpo, "pack_pairs", lambda *a, **k: (lambda p: calls.append(p.layout) or p)(real(*a, **k)))
    refs = compute_reference_logps(
        init_checkpoint, pairs, flavor="debug", vocab_size=VOCAB, rope_theta=THETA, seq_len=SEQ, pad_id=PAD,
        batch_size=4,
    )  # fmt: skip
    assert len(calls) == 3
    batch = encode_pairs(pairs, SEQ, PAD)
    with torch.no_grad():
        plain = _plain_logps(model, batch)[0]
    n = len(pairs)
    assert torch.allclose(torch.tensor(refs), torch.stack([plain[:n], plain[n:]], dim=1), atol=TOL, rtol=0)


def _job(tmp_path, checkpoint, pairs, metrics, **kwargs) -> DPOJob:
    defaults = dict(
        dump_folder=str(tmp_path), flavor="debug", vocab_size=VOCAB, rope_theta=THETA, seq_len=SEQ, steps=3,
        batch_size=4, lr=3e-3, checkpoint_interval=1000, init_weights_from=checkpoint,
        make_loader=pairs_loader(pairs, pad_id=PAD, shuffle=False), on_step=lambda step, m: metrics.append(m),
    )  # fmt: skip
    defaults.update(kwargs)
    return DPOJob(**defaults)


@pytest.mark.parametrize("kind", ["judge", "pivotal"])
def test_trainer_picks_the_fast_layout_and_trains_like_the_plain_one(tmp_path, init_checkpoint, monkeypatch, kind):
    """The trainer packs loader batches by itself (live reference through the same layout), and
    its losses and grad norms over 3 steps match the plain layout's."""
    pairs = judge_pairs(n=8) if kind == "judge" else pivotal_pairs(n=8)
    layouts: list[str] = []
    real = dpo.pack_pairs
    monkeypatch.setattr(dpo, "pack_pairs", lambda *a, **k: (lambda p: layouts.append(p.layout) or p)(real(*a, **k)))
    fast: list[dict] = []
    run_dpo(_job(tmp_path / "fast", init_checkpoint, pairs, fast))
    assert len(layouts) == 3 and all(name.startswith("fork" if kind == "judge" else "shared") for name in layouts)
    assert fast[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    monkeypatch.setattr(dpo, "is_plain_positions", lambda *a: False)  # force the plain layout
    plain: list[dict] = []
    run_dpo(_job(tmp_path / "plain", init_checkpoint, pairs, plain))
    assert len(layouts) == 3
    assert [m["loss"] for m in fast] == pytest.approx([m["loss"] for m in plain], abs=1e-5)
    assert [m["grad_norm"] for m in fast] == pytest.approx([m["grad_norm"] for m in plain], rel=1e-3)
    assert [m["dpo/margin"] for m in fast] == pytest.approx([m["dpo/margin"] for m in plain], abs=1e-4)
