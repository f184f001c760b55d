"""DPO core (phi4_engine.titan.dpo): losses, token-level sequence log-probs, the paired trainer.

Invariants from FACTS.md §7.10: step-0 loss with policy = reference is ln 2; the reference stays
bit-identical; cached reference log-probs train exactly like the live reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phi4_engine.titan import phi4
from phi4_engine.titan.dpo import (
    DPOJob,
    PreferencePair,
    build_dpo_trainer,
    compute_reference_logps,
    dpo_sigmoid_loss,
    encode_pairs,
    ipo_loss,
    pairs_loader,
    run_dpo,
    sequence_logps,
)
from phi4_engine.titan.generate import load_model, save_weights
from phi4_engine.titan.trainer import _process_group

VOCAB = 128
SEQ = 16
THETA = 10000.0
PAD = 0
TOKEN_A, TOKEN_B = 7, 9
LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A DCP checkpoint of a freshly built debug model: the 'previous stage' weights."""
    folder = tmp_path_factory.mktemp("init") / "step-0"
    spec = phi4.model_spec("debug", vocab_size=VOCAB, rope_theta=THETA, max_seq_len=SEQ)
    torch.manual_seed(0)
    model = spec.model.build()
    with torch.no_grad():
        model.init_states()
    save_weights(model.state_dict(), str(folder))
    return str(folder)


def _toy_pairs(n: int = 8, seed: int = 1) -> list[PreferencePair]:
    """Chosen always ends with TOKEN_A, rejected with TOKEN_B, after a shared response token."""
    g = torch.Generator().manual_seed(seed)
    return [
        PreferencePair(torch.randint(10, VOCAB, (6,), generator=g).tolist(), [5, TOKEN_A], [5, TOKEN_B])
        for _ in range(n)
    ]


def _job(tmp_path, checkpoint, pairs, *, ref_logps=None, **kwargs) -> DPOJob:
    metrics = kwargs.pop("metrics", None)
    defaults = dict(
        dump_folder=str(tmp_path / "run"), flavor="debug", vocab_size=VOCAB, rope_theta=THETA,
        seq_len=SEQ, steps=1, batch_size=4, lr=1e-3, checkpoint_interval=1000,
        make_loader=pairs_loader(pairs, pad_id=PAD, ref_logps=ref_logps), init_weights_from=checkpoint,
        reference="live" if ref_logps is None else "cached",
        on_step=None if metrics is None else (lambda step, m: metrics.append(m)),
    )  # fmt: skip
    defaults.update(kwargs)
    return DPOJob(**defaults)


def _reference_logps(checkpoint, pairs):
    return compute_reference_logps(
        checkpoint, pairs, flavor="debug", vocab_size=VOCAB, rope_theta=THETA, seq_len=SEQ, pad_id=PAD
    )


# -- losses ------------------------------------------------------------------------------------


def test_losses_by_formula():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -1.0])
    beta = 0.2
    h = (pc - rc) - (pr - rr)
    loss, metrics = dpo_sigmoid_loss(pc, pr, rc, rr, beta)
    assert torch.allclose(loss, -F.logsigmoid(beta * h).mean())
    assert float(metrics["margin"]) == pytest.approx(float(h.mean()))
    assert float(metrics["accuracy"]) == 1.0
    loss, _ = ipo_loss(pc, pr, rc, rr, beta)
    assert torch.allclose(loss, ((h - 1 / (2 * beta)) ** 2).mean())
    # (f) policy = reference: IPO gives (1/(2 beta))^2, sigmoid DPO ln 2
    same = torch.tensor([-4.0, -0.5])
    for beta in (0.1, 0.5):
        assert float(ipo_loss(same, same - 1, same, same - 1, beta)[0]) == pytest.approx((1 / (2 * beta)) ** 2)
        assert float(dpo_sigmoid_loss(same, same - 1, same, same - 1, beta)[0]) == pytest.approx(LN2)


# -- sequence log-probs ------------------------------------------------------------------------


def test_token_level_mask_matches_logits_by_hand(init_checkpoint):
    """(e) A pair differing in one token, scored on that token only: the loss equals the one
    computed by hand from the model's logits at the position before it."""
    model = load_model(init_checkpoint, flavor="debug", vocab_size=VOCAB, rope_theta=THETA, max_seq_len=SEQ)
    prompt = [11, 23, 35, 47, 59]
    pair = PreferencePair(prompt, [TOKEN_A], [TOKEN_B])
    batch = encode_pairs([pair], SEQ, PAD)
    assert batch["loss_mask"].sum(dim=1).tolist() == [1, 1]
    assert batch["loss_mask"][:, len(prompt)].all()
    with torch.no_grad():
        logp = sequence_logps(model, batch["input"], batch["loss_mask"], batch["positions"])
        by_hand = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
    assert logp[0].item() == pytest.approx(by_hand[TOKEN_A].item(), abs=1e-5)
    assert logp[1].item() == pytest.approx(by_hand[TOKEN_B].item(), abs=1e-5)
    ref_c, ref_r, beta = torch.tensor([-4.0]), torch.tensor([-5.5]), 0.1
    loss, _ = dpo_sigmoid_loss(logp[:1], logp[1:], ref_c, ref_r, beta)
    h = (by_hand[TOKEN_A] - ref_c) - (by_hand[TOKEN_B] - ref_r)
    assert loss.item() == pytest.approx(-F.logsigmoid(beta * h).item(), abs=1e-6)


def test_token_level_pair_through_the_trainer(tmp_path, init_checkpoint):
    """(e) The same one-token pair through the trainer (cached reference of chosen = -4,
    rejected = -5.5): its step-1 loss is the hand-computed one."""
    model = load_model(init_checkpoint, flavor="debug", vocab_size=VOCAB, rope_theta=THETA, max_seq_len=SEQ)
    prompt = [11, 23, 35, 47, 59]
    with torch.no_grad():
        by_hand = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), dim=-1)
    beta = 0.5
    h = (by_hand[TOKEN_A] + 4.0) - (by_hand[TOKEN_B] + 5.5)
    metrics: list[dict] = []
    pairs = [PreferencePair(prompt, [TOKEN_A], [TOKEN_B])]
    run_dpo(_job(tmp_path, init_checkpoint, pairs, ref_logps=[(-4.0, -5.5)], batch_size=1, beta=beta, metrics=metrics))
    assert metrics[0]["loss"] == pytest.approx(-F.logsigmoid(beta * h).item(), abs=1e-5)


def test_masks_reject_scoring_the_first_token():
    with pytest.raises(ValueError, match="position 0"):
        sequence_logps(None, torch.zeros(1, 4, dtype=torch.long), torch.tensor([[True, False, False, False]]))


# -- the trainer -------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["cached", "live"])
def test_step0_loss_is_ln2_when_policy_is_reference(tmp_path, init_checkpoint, reference):
    """(a) FACTS.md §7.10: with policy = reference the first logged loss is ln 2."""
    pairs = _toy_pairs()
    refs = _reference_logps(init_checkpoint, pairs) if reference == "cached" else None
    metrics: list[dict] = []
    run_dpo(_job(tmp_path, init_checkpoint, pairs, ref_logps=refs, metrics=metrics))
    assert metrics[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert metrics[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-4)


def test_ipo_step0_loss_at_reference(tmp_path, init_checkpoint):
    """(f) IPO with policy = reference: (1/(2 beta))^2."""
    metrics: list[dict] = []
    run_dpo(_job(tmp_path, init_checkpoint, _toy_pairs(), loss="ipo", beta=0.25, metrics=metrics))
    assert metrics[0]["loss"] == pytest.approx(4.0, abs=1e-4)


def test_live_reference_stays_bit_identical_and_policy_moves(tmp_path, init_checkpoint):
    """(b) Over several steps the live reference's tensors are unchanged (torch.equal), while
    every policy parameter tensor changed; the result's hashes say the same."""
    job = _job(tmp_path, init_checkpoint, _toy_pairs(), steps=3)
    with _process_group():
        trainer = build_dpo_trainer(job)
        try:
            before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
            trainer.train()
            policy = {
                k: getattr(v, "full_tensor", lambda v=v: v)().detach()  # FSDP2 holds DTensors
                for k, v in trainer.model_parts[0].named_parameters()
            }
            reference = dict(trainer.reference.named_parameters())
            assert all(not p.requires_grad and p.grad is None for p in reference.values())
            assert set(before) == set(trainer.reference.state_dict())
            assert all(torch.equal(before[k], v) for k, v in trainer.reference.state_dict().items())
            assert all(not torch.equal(policy[k], reference[k]) for k in policy)
        finally:
            trainer.close()
    result = run_dpo(_job(tmp_path / "again", init_checkpoint, _toy_pairs(), steps=3))
    assert result.reference_weights_sha256 == result.init_weights_sha256 != result.weights_sha256


def test_identical_pair_gives_zero_gradient(tmp_path, init_checkpoint):
    """(c) chosen = rejected carries no preference: every gradient is exactly 0 (or None)."""
    pair = PreferencePair([11, 23, 35, 47], [5, TOKEN_A, 3], [5, TOKEN_A, 3])
    job = _job(tmp_path, init_checkpoint, [pair], batch_size=1)
    with _process_group():
        trainer = build_dpo_trainer(job)
        try:
            trainer.train()
            grads = [p.grad for p in trainer.model_parts[0].parameters()]
            assert any(g is not None for g in grads)
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
        finally:
            trainer.close()


def test_toy_preference_is_learned_and_cached_equals_live(tmp_path, init_checkpoint):
    """(d) Chosen ends with A, rejected with B: the margin grows and the loss falls. The cached
    reference trains exactly like the live one (same losses, same final weights)."""
    pairs = _toy_pairs()
    live: list[dict] = []
    run_dpo(_job(tmp_path / "live", init_checkpoint, pairs, steps=6, lr=3e-3, metrics=live))
    assert live[-1]["loss"] < live[0]["loss"] - 0.01
    assert live[-1]["dpo/margin"] > live[0]["dpo/margin"] + 0.1
    assert all(b["dpo/margin"] > a["dpo/margin"] for a, b in zip(live, live[1:]))
    cached: list[dict] = []
    refs = _reference_logps(init_checkpoint, pairs)
    run_dpo(_job(tmp_path / "cached", init_checkpoint, pairs, ref_logps=refs, steps=6, lr=3e-3, metrics=cached))
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], abs=1e-5)


def test_init_weights_are_required(tmp_path):
    with pytest.raises(ValueError, match="init_weights_from"):
        run_dpo(_job(tmp_path, "", _toy_pairs()))


def test_losses_are_registered_as_plugins():
    from phi4_engine.manager import PluginHost
    from phi4_engine.choices import PreferenceLoss

    registry = PluginHost().collect_registry()
    assert {"cross-entropy", "dpo-sigmoid", "ipo"} <= set(registry.kinds["loss"])
    for kind in ("dpo-sigmoid", "ipo"):
        reg = registry.get("loss", kind)
        assert reg.spec_model(kind=kind).beta == 0.1
        assert registry.build("loss", reg.spec_model(kind=kind, beta=0.3)) == PreferenceLoss(kind, 0.3)
        with pytest.raises(ValueError):
            reg.spec_model(kind=kind, beta=0.0)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, init_checkpoint):
    """The loss is normalized by the pairs of the whole optimizer step: 2 micro-batches of 4
    pairs log the same loss and reach the same weights as one batch of 8."""
    pairs = _toy_pairs()
    big: list[dict] = []
    accumulated: list[dict] = []
    a = run_dpo(_job(tmp_path / "big", init_checkpoint, pairs, steps=2, batch_size=8, metrics=big))
    b = run_dpo(
        _job(tmp_path / "acc", init_checkpoint, pairs, steps=2, batch_size=4, global_batch_size=8, metrics=accumulated)
    )
    assert a.pairs == b.pairs == 16
    assert [m["loss"] for m in accumulated] == pytest.approx([m["loss"] for m in big], abs=1e-6)
    assert [m["grad_norm"] for m in accumulated] == pytest.approx([m["grad_norm"] for m in big], rel=1e-4)


@pytest.mark.filterwarnings("ignore:To get the last learning rate")  # torch, on scheduler resume
@pytest.mark.parametrize("reference", ["cached", "live"])
def test_resume_continues_the_same_run(tmp_path, init_checkpoint, reference):
    """Stop after 2 of 4 steps and run again in the same folder: steps 3-4 log what a straight
    run logs (loader cursor, optimizer and policy restored; the reference reloaded from init)."""
    pairs = _toy_pairs(n=5)
    refs = _reference_logps(init_checkpoint, pairs) if reference == "cached" else None
    common = dict(ref_logps=refs, decay_type="none", min_lr_factor=1.0, checkpoint_interval=2, batch_size=2)
    straight: list[dict] = []
    run_dpo(_job(tmp_path / "straight", init_checkpoint, pairs, steps=4, metrics=straight, **common))
    first: list[dict] = []
    second: list[dict] = []
    run_dpo(_job(tmp_path / "resumed", init_checkpoint, pairs, steps=2, metrics=first, **common))
    result = run_dpo(_job(tmp_path / "resumed", init_checkpoint, pairs, steps=4, metrics=second, **common))
    assert result.step == 4 and len(second) == 2
    assert [m["loss"] for m in first + second] == [m["loss"] for m in straight]


def test_pair_encoding_layout():
    """Chosen rows first, then rejected; prompt unscored; score_first limits scored tokens;
    over-long responses are cut at seq_len; labels are shifted targets on scored tokens."""
    from phi4_engine.titan.dpo import IGNORE_INDEX, shifted_labels

    pairs = [PreferencePair([1, 2], [3, 4, 5], [6], score_first=2), PreferencePair([7], [8] * 10, [9, 9])]
    batch = encode_pairs(pairs, 6, PAD)
    assert batch["input"].tolist() == [
        [1, 2, 3, 4, 5, PAD], [7, 8, 8, 8, 8, 8], [1, 2, 6, PAD, PAD, PAD], [7, 9, 9, PAD, PAD, PAD],
    ]  # fmt: skip
    assert batch["loss_mask"].int().tolist() == [
        [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0],
    ]  # fmt: skip
    labels = shifted_labels(batch["input"], batch["loss_mask"])
    assert labels[0].tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="no room"):
        encode_pairs([PreferencePair([1] * 6, [2], [3])], 6, PAD)
    with pytest.raises(ValueError, match="score_first"):
        encode_pairs([PreferencePair([1], [2], [3], score_first=0)], 6, PAD)
