"""``phi4-engine plan``: the arithmetic on a small case by hand, and full.json at paper scale."""

from __future__ import annotations

import pytest

from phi4_engine.engine import Engine
from phi4_engine.plan import GIB, Hardware, ModelNumbers, flops_per_token, memory_per_gpu, model_numbers
from tests.conftest import SPECS, run_cli


def test_fourteen_b_parameter_count_matches_the_paper():
    m = model_numbers("14b", 100352)
    assert m.total_params == 14_659_507_200  # FACTS.md §1
    assert m.layer_params == 340_797_440


def test_memory_and_flops_arithmetic_on_a_small_case():
    # d=8, 1 layer, 2 heads (hd 4), 1 kv head, ffn 16, vocab 10
    m = ModelNumbers(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab=10)
    layer = 8 * (8 + 2 * 4) + 8 * 8 + 3 * 8 * 16 + 2 * 8  # q,k,v + o + SwiGLU + 2 norms
    assert m.layer_params == layer == 592
    assert m.total_params == layer + 8 + 2 * 10 * 8 == 760
    assert flops_per_token(m, seq_len=4) == 6 * (760 - 80) + 12 * 1 * 8 * 4
    mem = memory_per_gpu(m, shards=2, tp=1, seq_len=4, micro_batch=3)
    assert mem["weights"] * GIB == pytest.approx(4 * 760 / 2)
    assert mem["optimizer"] * GIB == pytest.approx(8 * 760 / 2)
    assert mem["gathered"] * GIB == pytest.approx(4 * 592)
    assert mem["activations_no_ac"] * GIB == pytest.approx(3 * (34 * 4 * 8 + 8 * 4 * 10))
    assert mem["activations_full_ac"] * GIB == pytest.approx(3 * (2 * 4 * 8 + 34 * 4 * 8 + 8 * 4 * 10))
    base = (4 + 4 + 8) * 760 / 2 + 4 * 592
    assert mem["total_no_ac"] * GIB == pytest.approx(base + 3 * (34 * 32 + 320))
    halved = memory_per_gpu(m, shards=2, tp=2, seq_len=4, micro_batch=3)
    assert halved["weights"] == pytest.approx(mem["weights"] / 2)
    assert halved["activations_no_ac"] == pytest.approx(mem["activations_no_ac"] / 2)


def test_full_spec_on_1920_h100s_lands_near_the_reported_21_days():
    engine = Engine.from_file(SPECS / "full.json")
    plans = engine.plan(Hardware(gpus=1920, mfu=0.4))
    days = sum(p.days or 0 for p in plans)
    assert 2.1 < days < 210  # the public report: 21 days on 1920 H100s (order of magnitude)
    pretrain = plans[0]
    assert pretrain.tokens == pytest.approx(1e13, rel=1e-3) and pretrain.steps == 423_856
    assert pretrain.memory_gib["total_full_ac"] < 80  # FSDP over 1920 GPUs fits with checkpointing


def test_plan_cli_prints_a_table_and_refuses_bad_gpu_counts():
    out = run_cli("plan", str(SPECS / "full.json"), "--gpus", "1920")
    assert out.returncode == 0, out.stderr
    assert "14,659,507,200 parameters" in out.stdout and "pretrain" in out.stdout
    bad = run_cli("plan", str(SPECS / "full.json"), "--gpus", "6", "--tp", "4")
    assert bad.returncode == 2 and "multiple of the tensor-parallel degree" in bad.stderr
    assert "Traceback" not in bad.stderr
