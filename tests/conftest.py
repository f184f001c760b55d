"""Shared fixtures: repo paths, a CLI runner, and small spec builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_START_PYTHONPATH = os.environ.get("PYTHONPATH")
SPECS = REPO / "specs"


# ``make test`` runs the tiny pipeline (one module, ~6-12 minutes depending on the CPU) alone on
# both cores, then the rest in two pytest-xdist workers, one file at a time each (``-n 2 --dist
# loadfile --no-loadscope-reorder``, so xdist keeps this order instead of putting the files with
# the most tests first): the slow files first, then the rest, each worker pulling the next file
# when it is done, so both end close together. Tests in a worker run on one intra-op thread, so
# the two workers do not fight over the two cores. A plain ``pytest -n 2`` over everything starts
# the pipeline first (its fixture raises its thread count back to two).
PIPELINE_MODULE = "tests/integration/test_tiny_pipeline.py"


def pytest_collection_modifyitems(config, items):
    # --dist loadfile hands out whole files in collection order: the longest ones go first.
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    slow = {module(item) for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: (module(item) != PIPELINE_MODULE, module(item) not in slow))  # stable: files stay whole


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("PHI4_ENGINE_PROGRESS", "0")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``phi4-engine`` as a user would, in its own process: forked from the session's fork
    server (torch and the engine imported once: a run costs a fork, not seconds of imports), or
    a fresh interpreter when PYTHONPATH differs from this process's start (the fork server's
    ``sys.path`` is this process's; a plugin put on PYTHONPATH needs a new interpreter)."""
    if {**os.environ, **(env or {})}.get("PYTHONPATH") == _START_PYTHONPATH:
        from tests.reliability.conftest import Run

        return Run(list(args), dict(env or {}), plugins=False, cwd=str(cwd) if cwd else None).finish(timeout)
    full_env = {**os.environ, "PHI4_ENGINE_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "phi4_engine.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def tiny_pretrain_spec(steps: int = 30, **stage: object) -> dict:
    """A small, fast pretrain-only spec on the embedded corpus."""
    return {
        "version": 1,
        "name": "test-pretrain",
        "seed": 0,
        "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "checkpoint": {"interval": 10, "keep_latest_k": 2},
        "stages": [
            {
                "kind": "pretrain",
                "steps": steps,
                "seq_len": 64,
                "batch_size": 4,
                "lr": 0.003,
                "scheduler": {"kind": "warmup-cosine", "warmup_steps": 3},
                "data": {
                    "sources": [
                        {"kind": "synthetic-arithmetic", "name": "math", "num_documents": 300, "weight": 0.5},
                        {"kind": "synthetic-prose", "name": "prose", "num_documents": 300, "weight": 0.5},
                    ]
                },
                **stage,
            }
        ],
    }


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread than on two (and than two fighting for the
    cores with concurrent test runs). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXAMPLE_PLUGIN = REPO / "examples" / "phi4-engine-example-plugin"


@pytest.fixture(scope="session")
def installed_example(tmp_path_factory):
    """The example third-party plugin (entry point ``example``, distribution
    phi4-engine-example-plugin 0.2.0), pip-installed into a session folder put on PYTHONPATH
    for subprocesses only: the test process and the venv never see it. Shadowing its module on
    PYTHONPATH gives tests a plugin that misbehaves under a real distribution name and version."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--target", str(target), str(EXAMPLE_PLUGIN)]  # fmt: skip
    subprocess.run(pip, check=True, capture_output=True, text=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
        yield target
