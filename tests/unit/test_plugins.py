"""Plugin manager: built-ins like third-party plugins, duplicates, env switches, isolation."""

from __future__ import annotations

from typing import Literal

import pytest

from phi4_engine import hookimpl
from phi4_engine.data.source import DataSourceSpec
from phi4_engine.engine import Engine
from phi4_engine.errors import PluginError, SpecError
from phi4_engine.manager import BUILTIN_PLUGINS
from tests.conftest import tiny_pretrain_spec

EMPTY = {"name": "p", "stages": []}


class ExtraSpec(DataSourceSpec):
    kind: Literal["extra-source"]


class ExtraPlugin:
    __name__ = "extra"

    @hookimpl
    def phi4_register_data_sources(self, register):
        register("extra-source", ExtraSpec, lambda spec, ctx: None)


class OtherJsonlSpec(DataSourceSpec):
    kind: Literal["jsonl"]


class DuplicatePlugin:
    __name__ = "duplicate"

    @hookimpl
    def phi4_register_data_sources(self, register):
        register("jsonl", OtherJsonlSpec, lambda spec, ctx: None)


class MisspeltPlugin:
    __name__ = "misspelt"

    @hookimpl
    def phi4_register_stagez(self, register):
        pass


class RaisingPlugin:
    __name__ = "raising"

    @hookimpl
    def phi4_register_judges(self, register):
        raise RuntimeError("boom")


def test_builtins_listed_with_hooks_and_kinds():
    infos = {p.name: p for p in Engine(EMPTY).plugins()}
    assert set(BUILTIN_PLUGINS) <= set(infos)
    assert infos["stages"].kinds["stage"] == ["dpo-judge", "dpo-pivotal", "midtrain", "pretrain", "refusal", "sft"]
    assert infos["tokenizers"].hooks == ["phi4_register_tokenizers"]
    assert "phi4_step_end" in infos["loggers"].hooks
    assert infos["jsonl"].distribution == "phi4-engine"


def test_duplicate_kind_names_both_plugins():
    with pytest.raises(PluginError) as info:
        Engine(EMPTY, plugins=[DuplicatePlugin()])
    message = str(info.value)
    assert "'jsonl' is registered twice" in message and "'jsonl'" in message and "'duplicate'" in message


def test_misspelt_hook_fails_at_start():
    with pytest.raises(PluginError, match="misspelt.*phi4_register_stagez|phi4_register_stagez"):
        Engine(EMPTY, plugins=[MisspeltPlugin()])


def test_raising_hook_names_the_plugin():
    with pytest.raises(PluginError, match=r"plugin 'raising' .*failed in phi4_register_judges: RuntimeError: boom"):
        Engine(EMPTY, plugins=[RaisingPlugin()])


def test_engines_hold_independent_plugin_sets(tmp_path):
    spec = tiny_pretrain_spec()
    spec["stages"][0]["data"]["sources"].append({"kind": "extra-source"})
    with_extra = Engine(spec, plugins=[ExtraPlugin()], base_dir=tmp_path)
    without = Engine(spec, base_dir=tmp_path)
    with_extra.validate()
    with pytest.raises(SpecError, match="unknown kind 'extra-source'"):
        without.validate()


def test_disable_switch_removes_a_builtin(monkeypatch):
    monkeypatch.setenv("PHI4_ENGINE_DISABLE_PLUGINS", "synthetic")
    engine = Engine(EMPTY)
    assert "synthetic" not in {p.name for p in engine.plugins()}
    assert "synthetic-arithmetic" not in engine.registry.kinds["data_source"]


def test_trace_switch_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("PHI4_ENGINE_TRACE_PLUGINS", "1")
    engine = Engine(EMPTY)
    engine.host.pm.hook.phi4_run_start(run_dir="r", spec={})
    assert "phi4_run_start" in capsys.readouterr().err
