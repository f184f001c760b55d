"""Spec loading and validation: strictness, located errors, extends, --set, canonical form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi4_engine.engine import Engine
from phi4_engine.errors import SpecError
from phi4_engine.spec.load import apply_override, deep_merge, sha256_of
from tests.conftest import SPECS, tiny_pretrain_spec, write_spec


def engine_for(tmp_path: Path, data: dict, **kw) -> Engine:
    return Engine.from_file(write_spec(tmp_path / "spec.json", data), **kw)


@pytest.mark.parametrize("name", ["full.json", "tiny.json"])
def test_shipped_specs_validate(name):
    spec = Engine.from_file(SPECS / name).validate()
    assert [s.kind for s in spec.stages] == ["pretrain", "midtrain", "sft", "dpo-pivotal", "dpo-judge", "refusal"]


def test_every_shipped_spec_validates():
    for path in sorted(SPECS.glob("*.json")):
        Engine.from_file(path).validate()


def test_full_json_has_the_paper_values():
    spec = Engine.from_file(SPECS / "full.json").validate()
    pre, mid, sft, pts, judge, refusal = spec.stages
    assert spec.model.flavor == "14b" and spec.tokenizer.kind == "phi4"
    assert pre.seq_len == 4096 and pre.lr == 3e-4 and pre.weight_decay == 0.1 and pre.batch_size == 5760
    assert pre.tokens == 10e12
    weights = {s.name: s.weight for s in pre.data.sources}
    assert weights == {"web": 0.15, "web-rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "acquired": 0.10}
    assert mid.seq_len == 4 * pre.seq_len and mid.rope_theta == 250_000 and mid.lr == pytest.approx(pre.lr / 10)
    assert mid.long_fraction == 0.3 and mid.tokens == 250e9
    assert sft.lr == 1e-6 and sft.tokens == 8e9
    assert pts.pairs == 250_297 and pts.pts.p_gap == 0.2 and (pts.pts.p_min, pts.pts.p_max) == (0.2, 0.8)
    assert judge.pairs == 850_000
    assert refusal.dpo.first_tokens == 5 and refusal.dpo.pairs == 43_842  # unknown+safety pairs, Table 8


def test_tiny_extends_full_and_keeps_stage_order(tmp_path):
    spec = Engine.from_file(SPECS / "tiny.json").validate()
    assert spec.model.flavor == "tiny" and spec.tokenizer.kind == "phi4-mini"
    pre = spec.stages[0]
    assert pre.weight_decay == 0.1  # inherited from full.json
    assert [s.kind for s in pre.data.sources][0] == "synthetic-prose"  # kind changed: replaced whole


def _error(tmp_path, data) -> str:
    with pytest.raises(SpecError) as info:
        engine_for(tmp_path, data).validate()
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "spec.json") in message
    return message


def test_misspelt_field_is_located(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["learning_rate"] = 0.1
    message = _error(tmp_path, data)
    assert "stages[0].learning_rate: unknown field" in message


def test_misspelt_nested_field_is_located(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["sources"][1]["num_docs"] = 3
    assert "stages[0].data.sources[1].num_docs: unknown field" in _error(tmp_path, data)


def test_unknown_kind_lists_known_kinds(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["sources"][0]["kind"] = "synthetic-poetry"
    message = _error(tmp_path, data)
    assert "stages[0].data.sources[0]: unknown kind 'synthetic-poetry'" in message
    assert "synthetic-arithmetic" in message


def test_unknown_stage_kind(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["kind"] = "pretrian"
    assert "stages[0]: unknown kind 'pretrian'" in _error(tmp_path, data)


def test_missing_data_file_is_named(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["sources"] = [{"kind": "jsonl", "path": "nowhere.jsonl"}]
    message = _error(tmp_path, data)
    assert "stages[0].data.sources[0].path" in message and "nowhere.jsonl" in message


def test_wrong_type_and_missing_field(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["seq_len"] = "long"
    assert "stages[0].seq_len" in _error(tmp_path, data)
    data = tiny_pretrain_spec()
    del data["stages"][0]["lr"]
    assert "stages[0].lr: required field is missing" in _error(tmp_path, data)


def test_budget_needs_steps_or_tokens(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"][0]["tokens"] = 1000
    assert "exactly one of 'steps' or 'tokens'" in _error(tmp_path, data)


def test_duplicate_stage_names_rejected(tmp_path):
    data = tiny_pretrain_spec()
    data["stages"].append(data["stages"][0])
    assert "two stages are named 'pretrain'" in _error(tmp_path, data)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{\n  "name": "x",\n  "stages": [,]\n}')
    with pytest.raises(SpecError, match=r"spec.json:3:\d+: invalid JSON"):
        Engine.from_file(path)


def test_spec_is_data_not_code(tmp_path):
    data = tiny_pretrain_spec()
    data["name"] = "__import__('os').system('touch pwned')"
    assert "name" in _error(tmp_path, data)
    assert not (tmp_path / "pwned").exists()


def test_extends_deep_merges_and_detects_cycles(tmp_path):
    base = write_spec(tmp_path / "base.json", tiny_pretrain_spec(steps=30))
    child = write_spec(tmp_path / "child.json", {"extends": "base.json", "name": "child", "stages": [{"name": "pretrain", "steps": 7}]})
    spec = Engine.from_file(child).validate()
    assert spec.name == "child" and spec.stages[0].steps == 7 and spec.stages[0].lr == 0.003
    assert base.exists()
    write_spec(tmp_path / "a.json", {"extends": "b.json"})
    write_spec(tmp_path / "b.json", {"extends": "a.json"})
    with pytest.raises(SpecError, match="cycle"):
        Engine.from_file(tmp_path / "a.json")


def test_merge_rules():
    parent = {"a": {"x": 1, "y": 2}, "items": [{"name": "p", "kind": "k1", "v": 1}, {"name": "q", "kind": "k1", "v": 2}]}
    child = {"a": {"y": 3}, "items": [{"name": "q", "v": 5}, {"name": "p", "kind": "k2", "w": 1}, {"name": "r", "kind": "k1"}]}
    merged = deep_merge(parent, child)
    assert merged["a"] == {"x": 1, "y": 3}
    assert merged["items"] == [{"name": "p", "kind": "k2", "w": 1}, {"name": "q", "kind": "k1", "v": 5}, {"name": "r", "kind": "k1"}]
    nested = deep_merge({"source": {"kind": "jsonl", "path": "x"}}, {"source": {"kind": "synthetic-prose", "num_documents": 3}})
    assert nested == {"source": {"kind": "synthetic-prose", "num_documents": 3}}


def test_set_overrides(tmp_path):
    path = write_spec(tmp_path / "spec.json", tiny_pretrain_spec())
    engine = Engine.from_file(path, overrides=["stages.pretrain.steps=5", "stages.0.data.sources.prose.weight=0.25", "name=renamed"])
    spec = engine.validate()
    assert spec.stages[0].steps == 5 and spec.stages[0].data.sources[1].weight == 0.25 and spec.name == "renamed"
    assert Engine.from_file(path, overrides={"stages.pretrain.lr": 1e-4}).validate().stages[0].lr == 1e-4


def test_bad_set_is_one_line(tmp_path):
    data = tiny_pretrain_spec()
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_override(data, "stages.pretrain.steps")
    with pytest.raises(SpecError, match="no item 'sft'"):
        apply_override(data, "stages.sft.lr=1")


def test_canonical_sha_ignores_key_order():
    assert sha256_of({"a": 1, "b": [1, 2]}) == sha256_of({"b": [1, 2], "a": 1})
    assert sha256_of({"a": 1}) != sha256_of({"a": 2})


def test_schema_has_plugin_kinds_and_descriptions():
    schema = json.dumps(Engine({"name": "s", "stages": []}).schema())
    for kind in ("synthetic-arithmetic", "jsonl", "pretrain", "phi4-mini", "warmup-cosine"):
        assert f'"{kind}"' in schema
    assert "Share of the mixture's tokens" in schema  # a field docstring became a description


def test_spec_flavors_match_the_model_flavors():
    from phi4_engine.spec.models import MODEL_FLAVORS
    from phi4_engine.titan.phi4 import FLAVORS

    assert set(MODEL_FLAVORS) == set(FLAVORS)


def test_keep_latest_k_of_one_is_rejected(tmp_path):
    data = tiny_pretrain_spec()
    data["checkpoint"]["keep_latest_k"] = 1
    assert "checkpoint.keep_latest_k: must be 0 (keep all) or >= 2" in _error(tmp_path, data)


def test_tiny_differs_from_full_only_in_scale():
    """tiny.json keeps the recipe (stage graph, mixture, context and RoPE schedule, the midtrain
    LR ratio, DPO/PTS/refusal rules) and changes scale: model, vocabulary, budgets, data, and
    learning rates (a 5M-parameter model does not move at the paper's 1e-6; the one LR ratio
    the paper states, midtrain = pretrain / 10, is kept)."""
    full = Engine.from_file(SPECS / "full.json").validate()
    tiny = Engine.from_file(SPECS / "tiny.json").validate()
    assert [(s.name, s.kind) for s in tiny.stages] == [(s.name, s.kind) for s in full.stages]
    f, t = {s.name: s for s in full.stages}, {s.name: s for s in tiny.stages}
    weights = lambda st: {s.name: s.weight for s in st.data.sources}  # noqa: E731
    assert weights(t["pretrain"]) == weights(f["pretrain"])  # 15/15/40/20/10
    for spec in (full, tiny):
        st = {s.name: s for s in spec.stages}
        assert st["midtrain"].seq_len == 4 * st["pretrain"].seq_len
        assert st["midtrain"].rope_theta == 250_000 and st["midtrain"].long_fraction == 0.3
        assert st["midtrain"].lr == pytest.approx(st["pretrain"].lr / 10)
    assert t["pretrain"].weight_decay == f["pretrain"].weight_decay
    assert t["dpo-pivotal"].pts.model_dump(include={"p_gap", "p_min", "p_max", "temperature", "trajectories", "verifier"}) == \
        f["dpo-pivotal"].pts.model_dump(include={"p_gap", "p_min", "p_max", "temperature", "trajectories", "verifier"})
    for name in ("dpo-pivotal", "dpo-judge"):
        assert t[name].loss == f[name].loss and t[name].reference == f[name].reference
    assert t["dpo-judge"].judge.kind == "rule" and f["dpo-judge"].candidates == t["dpo-judge"].candidates
    assert t["refusal"].dpo.first_tokens == f["refusal"].dpo.first_tokens == 5
    assert t["refusal"].dpo.loss == f["refusal"].dpo.loss and t["refusal"].recall_from == f["refusal"].recall_from == "sft"
    # Scale knobs the paper gives no number for: a 5M model cannot tell which of its own answers
    # are wrong (teaching it to refuse "usually wrong" questions makes it refuse arithmetic at
    # large), and needs a larger refusal share to learn the bogus patterns in 60 steps.
    assert (f["refusal"].answer_above, f["refusal"].refuse_below) == (0.5, 1.0)
    assert (t["refusal"].answer_above, t["refusal"].refuse_below) == (0.0, 0.0)
