"""The CLI contract: exit codes, one-line errors without tracebacks, machine-readable listings."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SPECS, run_cli, tiny_pretrain_spec, write_spec


@pytest.mark.parametrize("name", ["full.json", "tiny.json"])
def test_validate_shipped_specs(name):
    result = run_cli("validate", str(SPECS / name))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s["stages"][0].update(lrr=1), "stages[0].lrr: unknown field"),
        (lambda s: s["stages"][0]["data"]["sources"][0].update(kind="nope"), "stages[0].data.sources[0]: unknown kind 'nope'"),
        (lambda s: s["stages"][0]["data"]["sources"].append({"kind": "jsonl", "path": "missing.jsonl"}), "stages[0].data.sources[2].path: file not found: missing.jsonl"),
    ],
    ids=["misspelt-field", "unknown-kind", "missing-data-file"],
)
def test_validate_errors_are_one_line_exit_2(tmp_path, mutate, expected):
    data = tiny_pretrain_spec()
    mutate(data)
    path = write_spec(tmp_path / "bad.json", data)
    line = _one_line_error(run_cli("validate", str(path)))
    assert str(path) in line and expected in line


def test_missing_spec_and_bad_set(tmp_path):
    assert "spec file not found" in _one_line_error(run_cli("validate", str(tmp_path / "none.json")))
    path = write_spec(tmp_path / "spec.json", tiny_pretrain_spec())
    assert "expected KEY=VALUE" in _one_line_error(run_cli("validate", str(path), "--set", "stages.pretrain.lr"))
    assert "no stage named 'sft'" in _one_line_error(run_cli("run", str(path), "--stages", "sft", "--run-dir", str(tmp_path / "r")))


def test_usage_error_exit_2():
    assert run_cli("frobnicate").returncode == 2


def test_plugins_json_lists_builtins_with_hooks_and_kinds():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["synthetic"]["kinds"]["data_source"] == ["synthetic-academic", "synthetic-arithmetic", "synthetic-code", "synthetic-prose", "synthetic-refusal"]
    assert plugins["synthetic"]["hooks"] == ["phi4_register_data_sources"]
    assert plugins["stages"]["kinds"]["stage"][0] == "dpo-judge"
    for p in plugins.values():
        assert p["distribution"] and p["version"] and isinstance(p["hooks"], list)


def test_stages_and_schema():
    stages = run_cli("stages")
    assert stages.returncode == 0 and "pretrain" in stages.stdout and "refusal" in stages.stdout
    schema = run_cli("schema")
    assert schema.returncode == 0
    assert "synthetic-arithmetic" in json.dumps(json.loads(schema.stdout))


def test_dpo_stage_without_starting_weights_says_so_in_one_line(tmp_path):
    result = run_cli("run", str(SPECS / "dpo-judge.json"), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 1, result.stderr
    assert "trains from the previous stage's weights" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_reruns_a_finished_stage_evaluations(tmp_path):
    data = tiny_pretrain_spec(steps=4)
    data["stages"][0]["evaluations"] = [
        {"kind": "heldout-loss", "name": "heldout", "source": {"kind": "synthetic-prose", "name": "held"}, "lengths": [32], "sequences": 2}
    ]
    spec = write_spec(tmp_path / "spec.json", data)
    run_dir = tmp_path / "run"
    assert run_cli("run", str(spec), "--run-dir", str(run_dir)).returncode == 0
    saved = json.loads((run_dir / "pretrain" / "eval.json").read_text())["after"]["heldout"]["loss@32"]
    result = run_cli("eval", str(run_dir), "--stage", "pretrain")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["stage"] == "pretrain" and out["after"]["heldout"]["loss@32"] == saved  # same weights, same loss
    missing = run_cli("eval", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "not a run directory" in missing.stderr and "Traceback" not in missing.stderr


def test_relative_run_dir_hands_weights_to_the_next_stage(tmp_path):
    """`make demo` passes a relative --run-dir; the handoff path must still work."""
    data = tiny_pretrain_spec(steps=3)
    data["stages"].append({**data["stages"][0], "name": "more", "steps": 2})
    write_spec(tmp_path / "spec.json", data)
    result = run_cli("run", "spec.json", "--run-dir", "runs/rel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ledger = json.loads((tmp_path / "runs" / "rel" / "ledger.json").read_text())
    more = ledger["stages"]["more"]
    assert more["init_weights_sha256"] == ledger["stages"]["pretrain"]["weights_sha256"]
    assert more["init_checkpoint"].startswith(str(tmp_path))
