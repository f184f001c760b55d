"""Plugins the tests register: in-process (``plugins=[tests.plugins]``, the reliability driver)
or, for processes the test cannot reach into (``--nproc`` ranks), by entry point with
:func:`entry_point_path`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from phi4_engine import hookimpl
from phi4_engine.spec.base import SpecModel
from phi4_engine.stage import StageSpec


class HasThreeSpec(SpecModel):
    kind: Literal["has-three"]


class HasThree:
    """A verifier a barely trained model passes sometimes: the completion contains a 3."""

    name, version = "has-three", "1"

    def __init__(self, spec: HasThreeSpec) -> None:
        self.spec = spec

    def verify(self, task_meta, completion) -> bool:
        return "3" in completion


@hookimpl
def phi4_register_verifiers(register):
    register("has-three", HasThreeSpec, HasThree)


class SingleProcessSpec(StageSpec):
    kind: Literal["single-process"]


class SingleProcessStage:
    """A third-party stage that does not declare ``distributed = True``."""

    def __init__(self, spec: SingleProcessSpec, ctx) -> None:
        self.ctx = ctx

    def run(self) -> dict:
        return {"steps": 0}


@hookimpl
def phi4_register_stages(register):
    register("single-process", SingleProcessSpec, SingleProcessStage)


def entry_point_path(folder: Path) -> str:
    """A folder to put on PYTHONPATH (with the repository) so that every ``phi4-engine``
    process finds this module as an installed plugin distribution (a bare ``.dist-info``)."""
    info = folder / "phi4_engine_test_plugins-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: phi4-engine-test-plugins\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[phi4_engine]\ntest-plugins = tests.plugins\n")
    return str(folder)
