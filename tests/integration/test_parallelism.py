"""Parallelism plugins: layouts resolve against the world size, step options reach torchtitan,
float8 is refused on a CPU before anything runs and trains in emulation."""

from __future__ import annotations

import pytest

from phi4_engine.choices import Layout
from phi4_engine.engine import Engine
from phi4_engine.errors import EngineError
from phi4_engine.titan import layouts
from tests.conftest import run_cli, tiny_pretrain_spec, write_spec
from tests.reliability.conftest import metrics

def _layout(parallelism: dict) -> Layout:
    engine = Engine({**tiny_pretrain_spec(), "parallelism": parallelism})
    return engine.registry.build("parallelism", engine.validate().parallelism)


def test_kinds_translate_to_layouts():
    assert _layout({"kind": "fsdp2"}) == Layout(dp_shard=-1)
    assert _layout({"kind": "hsdp", "replicate_degree": 2}) == Layout(dp_replicate=2)
    tp = _layout({"kind": "fsdp2+tp", "tp_degree": 2, "activation_checkpointing": "full", "float8": {"emulate": True}})
    assert (tp.tp, tp.activation_checkpointing, tp.float8, tp.float8_emulate) == (2, "full", "rowwise", True)
    assert _layout({"kind": "auto"}).auto


@pytest.mark.parametrize(
    "layout, world, params, expected",
    [
        (Layout(auto=True), 1, 5e6, (1, 1, 1)),
        (Layout(auto=True), 8, 14.7e9, (1, 8, 1)),  # one node: FSDP2 only
        (Layout(auto=True), 64, 14.7e9, (1, 8, 8)),  # many nodes at 14B: TP 8 within a node
        (Layout(auto=True), 64, 1e9, (1, 64, 1)),
        (Layout(dp_replicate=2), 8, 0, (2, 4, 1)),
        (Layout(tp=2), 2, 0, (1, 1, 2)),
    ],
)
def test_resolve(layout, world, params, expected):
    got = layouts.resolve(layout, world, int(params))
    assert (got.dp_replicate, got.dp_shard, got.tp) == expected


def test_resolve_refuses_what_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        layouts.resolve(Layout(tp=4), 6, 0)
    with pytest.raises(ValueError, match="but the world size is 8"):
        layouts.resolve(Layout(dp_shard=3), 8, 0)


def test_float8_on_cpu_is_refused_before_anything_runs(tmp_path):
    data = {**tiny_pretrain_spec(steps=2), "parallelism": {"kind": "fsdp2", "float8": {"recipe": "rowwise"}}}
    spec = write_spec(tmp_path / "spec.json", data)
    done = run_cli("run", str(spec), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "compute capability 8.9" in done.stderr  # torchao comes with the [test] extra
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_float8_emulation_trains_on_cpu(tmp_path):
    data = {**tiny_pretrain_spec(steps=12), "parallelism": {"kind": "auto", "float8": {"emulate": True}}}
    spec = write_spec(tmp_path / "spec.json", data)
    result = Engine.from_file(spec, run_dir=tmp_path / "run").run()
    m = result.stages["pretrain"].metrics
    assert m["loss_last"] < m["loss_first"] - 0.5, m  # measured: 8.15 -> 7.47
    plain = Engine.from_file(write_spec(tmp_path / "plain.json", tiny_pretrain_spec(steps=12)), run_dir=tmp_path / "plain").run()
    # Same model and data; float8 rounding changes the numbers but not the learning.
    assert metrics(tmp_path / "run" / "pretrain") != metrics(tmp_path / "plain" / "pretrain")
    assert abs(m["loss_last"] - plain.stages["pretrain"].metrics["loss_last"]) < 0.5


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_recomputes_the_same_step(tmp_path, mode):
    base = tiny_pretrain_spec(steps=4)
    plain = Engine.from_file(write_spec(tmp_path / "a.json", base), run_dir=tmp_path / "a").run()
    data = {**base, "parallelism": {"kind": "auto", "activation_checkpointing": mode}}
    ac = Engine.from_file(write_spec(tmp_path / "b.json", data), run_dir=tmp_path / "b").run()
    losses = [r["loss"] for r in metrics(tmp_path / "a" / "pretrain")]
    assert [r["loss"] for r in metrics(tmp_path / "b" / "pretrain")] == pytest.approx(losses, rel=1e-5)
    assert plain.stages["pretrain"].summary["weights_sha256"]  # both ran to the end


def test_float8_check_names_the_gpu_requirement():
    with pytest.raises(EngineError, match="emulate: true"):
        layouts.check(Layout(float8="rowwise"))
    layouts.check(Layout(float8="rowwise", float8_emulate=True))
    layouts.check(Layout())
