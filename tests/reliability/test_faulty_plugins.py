"""A third-party plugin that raises in a hook, returns the wrong type or lacks what its category
needs → one line naming the plugin, its distribution and version (exit 2); the run dir stays
resumable. Through the CLI the faulty plugin is the installed example plugin's module shadowed on
PYTHONPATH, so it carries a real distribution name and version; in-process cases pass plugin
objects (named ``(object -)``)."""

from __future__ import annotations

import os
import textwrap
from typing import Literal

import pytest

from phi4_engine import hookimpl
from phi4_engine.choices import Layout
from phi4_engine.data.source import DataSourceSpec, Document
from phi4_engine.engine import Engine
from phi4_engine.errors import PluginError
from phi4_engine.spec.base import SpecModel
from tests.conftest import run_cli, tiny_pretrain_spec, write_spec
from tests.reliability.conftest import ledger, metrics

PLUGIN = "plugin 'example' (phi4-engine-example-plugin 0.2.0)"
HEADER = "from phi4_engine import hookimpl\n"


def _shadow(tmp_path, body: str) -> dict[str, str]:
    package = tmp_path / "shadow" / "phi4_engine_example"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(HEADER + textwrap.dedent(body))
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ["PYTHONPATH"]])}


def _spec(tmp_path, source: str | None = None) -> str:
    data = tiny_pretrain_spec(steps=6)
    data["checkpoint"] = {"interval": 2, "keep_latest_k": 2}
    if source:
        data["stages"][0]["data"]["sources"].append({"kind": source, "name": "counting", "weight": 0.2})
    return str(write_spec(tmp_path / "spec.json", data))


def _one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback
    return lines[0]


def test_raising_in_a_lifecycle_hook_then_resume(installed_example, tmp_path):
    env = _shadow(tmp_path, """
        @hookimpl
        def phi4_step_end(stage, stage_dir, step, metrics):
            if step == 3:
                raise RuntimeError("dashboard unreachable")
    """)
    spec, run = _spec(tmp_path), tmp_path / "run"
    line = _one_line_error(run_cli("run", spec, "--run-dir", str(run), env=env))
    assert line == f"phi4-engine: error: {PLUGIN} failed in phi4_step_end: RuntimeError: dashboard unreachable"
    assert ledger(run)["stages"]["pretrain"]["status"] == "failed"
    # Fixed plugin (the real one): the same command resumes from the last checkpoint.
    again = run_cli("run", spec, "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in metrics(run / "pretrain")] == list(range(1, 7))


class CountingSpec(DataSourceSpec):
    kind: Literal["faulty-counting"]


class DictSource:
    name = "counting"

    def __init__(self, spec, ctx) -> None:
        pass

    def __len__(self) -> int:
        return 10

    def documents(self, start: int = 0):
        yield {"text": "a dict, not a Document"}


class RaisingSource(DictSource):
    def documents(self, start: int = 0):
        yield Document(id="0", text="fine")
        raise KeyError("row 2")


class NoDocuments:
    def __init__(self, spec, ctx) -> None:
        pass


class LooseSpec(SpecModel):
    kind: str = "faulty-counting"


def _source_plugin(spec_model, factory):
    class Faulty:
        __name__ = "faulty"

        @hookimpl
        def phi4_register_data_sources(self, register):
            register("faulty-counting", spec_model, factory)

    return Faulty()


@pytest.mark.parametrize(
    "spec_model, factory, expected",
    [
        (CountingSpec, DictSource, "data source 'counting' yielded a dict; documents() must yield phi4_engine.data.source.Document"),
        (CountingSpec, NoDocuments, "built data_source 'faulty-counting' as a NoDocuments, which lacks documents"),
        (CountingSpec, RaisingSource, "data source 'counting' failed: KeyError: 'row 2'"),
        (LooseSpec, DictSource, "registered data_source 'faulty-counting' with spec model 'LooseSpec', which needs a "
                                "field kind: Literal['faulty-counting']"),
    ],
    ids=["wrong-type", "missing-method", "raises-while-reading", "bad-spec-model"],
)
def test_misbehaving_source_is_named(tmp_path, spec_model, factory, expected):
    spec = _spec(tmp_path, "faulty-counting")
    with pytest.raises(PluginError) as info:
        Engine.from_file(spec, run_dir=tmp_path / "run", plugins=[_source_plugin(spec_model, factory)]).run()
    assert str(info.value).startswith("plugin 'faulty' (object -)") and expected in str(info.value)


def test_missing_plugin_is_named(installed_example, tmp_path):
    spec = _spec(tmp_path, "example-counting")
    line = _one_line_error(run_cli("run", spec, "--run-dir", str(tmp_path / "run"), env={"PHI4_ENGINE_LOAD_PLUGINS": ""}))
    assert "unknown kind 'example-counting'" in line


# -- in-process: verifiers and plain-value factories ------------------------------------------------


class AnySpec(SpecModel):
    kind: Literal["sloppy"]


class SloppyVerifier:
    def __init__(self, spec) -> None:
        pass

    def verify(self, task_meta, completion):
        return "yes"


class SloppyPlugin:
    __name__ = "sloppy"

    @hookimpl
    def phi4_register_verifiers(self, register):
        register("sloppy", AnySpec, SloppyVerifier)

    @hookimpl
    def phi4_register_parallelisms(self, register):
        register("sloppy", AnySpec, lambda spec: {"dp_shard": 2})


def test_wrong_return_types_are_named():
    engine = Engine(tiny_pretrain_spec(), plugins=[SloppyPlugin()])
    verifier = engine.registry.build("verifier", AnySpec(kind="sloppy"))
    with pytest.raises(PluginError, match=r"plugin 'sloppy' \(object -\): verifier 'SloppyVerifier' returned str 'yes'"):
        verifier.verify_many([({}, "42")])
    with pytest.raises(PluginError, match=r"built parallelism 'sloppy' as a dict; expected a phi4_engine.choices.Layout"):
        engine.registry.build("parallelism", AnySpec(kind="sloppy"))
    assert isinstance(engine.registry.build("parallelism", engine.validate().parallelism), Layout)
