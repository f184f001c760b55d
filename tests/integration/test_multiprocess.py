"""Two processes on CPU (gloo), launched by ``phi4-engine run --nproc 2`` through torchrun:
FSDP2 and FSDP2 × TP give the same losses as one process over 20 steps, and a checkpoint written
by two processes continues in one (``--reshard``) with the same losses.

Every comparison starts from the same weights: a one-process ``pretrain`` stage hands over to the
``more`` stage under test (a fresh stage's random initialization is drawn per rank on a CPU mesh,
see the issue note)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, tiny_pretrain_spec, write_spec
from tests.reliability.conftest import ledger, metrics

pytestmark = pytest.mark.slow

STEPS = 20
TOLERANCE = 1e-5  # relative, per step; measured: 2e-7 (FSDP2), 7e-7 (TP 2)


def _spec(tmp_path: Path, flavor: str) -> Path:
    data = tiny_pretrain_spec(steps=3)
    data["model"] = {"flavor": flavor}
    data["checkpoint"] = {"interval": 10, "keep_latest_k": 2}
    data["stages"].append({**data["stages"][0], "name": "more", "steps": STEPS})
    return write_spec(tmp_path / f"{flavor}.json", data)


def _one_process_then(spec: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    first = run_cli("run", str(spec), "--run-dir", str(run), "--stages", "pretrain")
    assert first.returncode == 0, first.stderr
    return run_cli("run", str(spec), "--run-dir", str(run), *args, env={"OMP_NUM_THREADS": "1"})


def _kill_all_running(run: Path) -> None:
    """SIGKILL every process whose command line names ``run`` (a power cut, for this run only)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(run).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run / "more")]


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "flavor, parallelism",
    [("debug", {"kind": "fsdp2"}), ("tiny", {"kind": "fsdp2+tp", "tp_degree": 2})],
    ids=["fsdp2", "fsdp2+tp"],
)
def test_two_processes_match_one(tmp_path, flavor, parallelism):
    spec = _spec(tmp_path, flavor)
    one = _one_process_then(spec, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _one_process_then(spec, tmp_path / "two", "--nproc", "2", "--set", f"parallelism={json.dumps(parallelism)}")
    assert two.returncode == 0, two.stderr
    assert _close(_losses(tmp_path / "one"), _losses(tmp_path / "two")) < TOLERANCE
    entry = ledger(tmp_path / "two")["stages"]["more"]
    assert entry["world_size"] == 2 and entry["tokens"] == ledger(tmp_path / "one")["stages"]["more"]["tokens"]
    files = sorted(p.name for p in (tmp_path / "two" / "more" / "checkpoints" / f"step-{STEPS}").iterdir())
    assert "__1_0.distcp" in files and "manifest.json" in files  # both ranks wrote, one manifest


def test_a_two_process_checkpoint_continues_in_one(tmp_path):
    spec = _spec(tmp_path, "debug")
    straight = _one_process_then(spec, tmp_path / "one")
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "two"
    assert run_cli("run", str(spec), "--run-dir", str(run), "--stages", "pretrain").returncode == 0
    cmd = [sys.executable, "-m", "phi4_engine.cli", "run", str(spec), "--run-dir", str(run), "--nproc", "2",
           "--set", 'parallelism={"kind": "fsdp2"}']  # fmt: skip
    env = {**os.environ, "PHI4_ENGINE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    manifest = run / "more" / "checkpoints" / "step-10" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists():
        assert launcher.poll() is None and time.time() < deadline, "the two-process run ended before step 10"
        time.sleep(0.01)
    _kill_all_running(run)  # the launcher and both ranks (torchrun gives workers their own sessions)
    launcher.wait()

    refused = run_cli("run", str(spec), "--run-dir", str(run))
    assert refused.returncode == 2 and "world_size: 2 -> 1" in refused.stderr and "--reshard" in refused.stderr
    resumed = run_cli("run", str(spec), "--run-dir", str(run), "--reshard")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(run / "more")] == list(range(1, STEPS + 1))
    assert _close(_losses(tmp_path / "one"), _losses(run)) < TOLERANCE
    assert ledger(run)["stages"]["more"]["reshards"][0]["from"] == 2
