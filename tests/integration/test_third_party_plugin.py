"""A third-party plugin package, installed with pip, adds a data source used by a pretrain run."""

from __future__ import annotations

import json
import os

from tests.conftest import run_cli, tiny_pretrain_spec, write_spec


def test_entry_point_plugin_is_listed(installed_example):
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json").stdout)}
    example = plugins["example"]
    assert example["distribution"] == "phi4-engine-example-plugin" and example["version"] == "0.2.0"
    assert example["kinds"] == {"data_source": ["example-counting"]}


def test_pretrain_uses_the_plugin_source(installed_example, tmp_path):
    data = tiny_pretrain_spec(steps=6)
    data["stages"][0]["data"]["sources"].append({"kind": "example-counting", "name": "counting", "weight": 1.0})
    spec = write_spec(tmp_path / "spec.json", data)
    result = run_cli("run", str(spec), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    drawn = {d["name"]: d["tokens"] for d in ledger["stages"]["pretrain"]["data"]}
    assert drawn["counting"] > 0
    assert "phi4-engine-example-plugin 0.2.0" in ledger["plugins"]["example"]


def test_load_switch_can_exclude_it(installed_example, tmp_path):
    result = run_cli("plugins", "--json", env={"PHI4_ENGINE_LOAD_PLUGINS": ""})
    names = {p["name"] for p in json.loads(result.stdout)}
    assert "example" not in names and "synthetic" in names  # built-ins always load
    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["sources"].append({"kind": "example-counting"})
    spec = write_spec(tmp_path / "spec.json", data)
    result = run_cli("validate", str(spec), env={"PHI4_ENGINE_LOAD_PLUGINS": ""})
    assert result.returncode == 2 and "unknown kind 'example-counting'" in result.stderr


def test_broken_plugin_is_named_with_distribution_and_version(installed_example, tmp_path, monkeypatch):
    # Shadow the plugin module with one that fails at import.
    (tmp_path / "phi4_engine_example").mkdir()
    (tmp_path / "phi4_engine_example" / "__init__.py").write_text("raise ImportError('missing optional dependency frobz')\n")
    result = run_cli("plugins", env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])})
    assert result.returncode == 2
    assert "plugin 'example' (phi4-engine-example-plugin 0.2.0) failed to import: ImportError: missing optional dependency frobz" in result.stderr
