"""A spec changed between a run and its resume: identity fields (architecture, tokenizer, seed,
data, anything of a stage that has started but its evaluations, the data-parallel world size)
are a hard error with the diff; safe fields (logging, checkpoint policy, stages not started yet)
are allowed and recorded in the ledger."""

from __future__ import annotations

import pytest

from phi4_engine.engine import Engine
from phi4_engine.errors import SpecError
from phi4_engine.rundir import json_diff
from tests.conftest import run_cli, tiny_pretrain_spec, write_spec
from tests.reliability.conftest import ledger


def _two_stages() -> dict:
    data = tiny_pretrain_spec(steps=4)
    data["stages"].append({**data["stages"][0], "name": "more", "steps": 2})
    return data


@pytest.fixture(scope="module")
def half_done(tmp_path_factory):
    """``pretrain`` finished, ``more`` not started."""
    tmp = tmp_path_factory.mktemp("changes")
    spec = write_spec(tmp / "spec.json", _two_stages())
    Engine.from_file(spec, run_dir=tmp / "run").run(["pretrain"])
    return spec, tmp / "run"


@pytest.mark.parametrize(
    "override, shown",
    [
        ({"model.flavor": "tiny"}, 'model.flavor: "debug" -> "tiny"'),
        ({"tokenizer.vocab_ranks": 1024}, "tokenizer.vocab_ranks: 2048 -> 1024"),
        ({"seed": 3}, "seed: 0 -> 3"),
        ({"stages.pretrain.lr": 0.001}, "stages.pretrain.lr: 0.003 -> 0.001"),
        ({"stages.pretrain.data.sources.math.num_documents": 301},
         "stages.pretrain.data.sources[0].num_documents: 300 -> 301"),
        ({"stages.pretrain.steps": 8}, "stages.pretrain.steps: 4 -> 8"),
    ],
    ids=["architecture", "tokenizer", "seed", "optimizer", "data", "budget"],
)
def test_identity_change_is_refused_with_the_diff(half_done, override, shown):
    spec, run = half_done
    before = (run / "spec.json").read_bytes()
    with pytest.raises(SpecError) as info:
        Engine.from_file(spec, run_dir=run, overrides=override).run()
    assert shown in str(info.value) and "identity fields changed" in str(info.value)
    assert (run / "spec.json").read_bytes() == before  # nothing recorded, nothing lost


def test_identity_change_from_the_cli_is_one_line_exit_2(half_done):
    spec, run = half_done
    done = run_cli("run", str(spec), "--run-dir", str(run), "--set", "seed=9")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "seed: 0 -> 9" in done.stderr


def test_safe_changes_are_allowed_and_recorded(half_done, capsys):
    spec, run = half_done
    overrides = {"logging.tensorboard": False, "checkpoint.keep_latest_k": 3, "stages.more.lr": 0.001}
    result = Engine.from_file(spec, run_dir=run, overrides=overrides).run()
    assert result.stages["pretrain"].status == "skipped" and result.stages["more"].status == "done"
    changes = ledger(run)["spec_changes"][-1]["changes"]
    assert changes == [
        "checkpoint.keep_latest_k: 2 -> 3",
        "logging.tensorboard: true -> false",
        "stages.more.lr: 0.003 -> 0.001",
    ]
    assert "recorded in ledger.json" in capsys.readouterr().err


def test_a_different_world_size_cannot_continue_a_started_stage(tmp_path):
    spec = write_spec(tmp_path / "spec.json", tiny_pretrain_spec(steps=4))
    run = tmp_path / "run"
    Engine.from_file(spec, run_dir=run).run()
    # As if the stage had been started by `--nproc 2` and stopped half-way.
    from phi4_engine.rundir import RunDir

    book = ledger(run)
    book["stages"]["pretrain"].update(status="failed", world_size=2)
    RunDir(run).write_ledger(book)
    with pytest.raises(SpecError, match=r"world_size: 2 -> 1 \(resume with --nproc 2"):
        Engine.from_file(spec, run_dir=run).run()


def test_json_diff_names_leaves():
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    new = {"a": {"b": 2, "c": [1, 3]}, "d": "x", "e": None}
    assert json_diff(old, new) == [("a.b", 1, 2), ("a.c[1]", 2, 3)]
    assert json_diff({"l": [1]}, {"l": [1, 2]}) == [("l", [1], [1, 2])]
