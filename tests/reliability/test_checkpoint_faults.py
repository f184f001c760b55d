"""Faults around checkpoints and training numerics, each injected into a real run:

* a kill while a checkpoint is written (after the shards, before DCP's ``.metadata``; and after
  it, before the engine's manifest) → the next run quarantines the torn folder, resumes from the
  last committed checkpoint, earlier checkpoints are byte-identical, the result equals an
  uninterrupted run;
* a corrupted checkpoint (flipped byte, truncated, missing or extra file) → named by file from
  the sha256 manifest before loading; the run refuses, or falls back when the spec says so;
* a NaN loss or an inf gradient → stops before the optimizer step with exit code 4 and a
  diagnostic naming step and batch; the last checkpoint resumes;
* disk full while saving (injected, and for real on a small tmpfs) → exit code 5 naming the folder
  and the cause; nothing marked complete; with room made, the same command finishes the run.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Literal

import orjson
import pytest
import torch

from phi4_engine import checkpoints, hookimpl
from phi4_engine.engine import Engine
from phi4_engine.errors import CheckpointError
from phi4_engine.rundir import RunDir
from phi4_engine.stage import StageSpec
from phi4_engine.titan.generate import load_model_weights, save_weights
from phi4_engine.titan.phi4 import model_spec
from tests.conftest import tiny_pretrain_spec, write_spec
from tests.reliability.conftest import ledger, metrics, run_driver, tensorboard_steps

STEPS = 12


def _spec(tmp_path: Path, **checkpoint) -> Path:
    data = tiny_pretrain_spec(steps=STEPS)
    data["checkpoint"] = {"interval": 2, "keep_latest_k": 0, **checkpoint}
    return write_spec(tmp_path / "spec.json", data)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must end equal to."""
    tmp = tmp_path_factory.mktemp("straight")
    done = run_driver("run", str(_spec(tmp)), "--run-dir", str(tmp / "run"))
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _assert_same_run(run: Path, straight: Path) -> None:
    assert ledger(run)["stages"]["pretrain"]["weights_sha256"] == ledger(straight)["stages"]["pretrain"]["weights_sha256"]
    assert metrics(run / "pretrain") == metrics(straight / "pretrain")
    assert tensorboard_steps(run / "pretrain") == list(range(1, STEPS + 1))


def test_kills_while_writing_checkpoints(tmp_path, straight):
    """Killed after step-6's shards (no .metadata), then after step-10's .metadata (no
    manifest): each time the torn folder is quarantined and the run goes on from the newest
    committed checkpoint; earlier checkpoints stay byte-identical."""
    spec, run = _spec(tmp_path), tmp_path / "run"
    ckpts = run / "pretrain" / "checkpoints"
    for fault, step, metadata in (("kill-mid-save", 6, False), ("kill-before-commit", 10, True)):
        killed = run_driver("run", str(spec), "--run-dir", str(run), PHI4_TEST_FAULT=f"{fault}:{step}")
        assert killed.returncode == -9, killed.stderr
        torn = ckpts / f"step-{step}"
        assert torn.is_dir() and not (torn / "manifest.json").exists()
        assert (torn / ".metadata").exists() == metadata
        kept = {p.name: _tree_digest(p) for p in ckpts.iterdir() if p != torn}
        assert kept, "earlier checkpoints exist"
        first_kept = first_kept if step == 10 else kept
    assert first_kept.keys() == {"step-2", "step-4"}
    assert {name: kept[name] for name in first_kept} == first_kept  # untouched by the second run

    again = run_driver("run", str(spec), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    quarantined = sorted(q.name.split(".")[0] for q in (run / "pretrain" / "checkpoints-quarantine").iterdir())
    assert quarantined == ["step-10", "step-6"]  # both torn saves kept for a person to look at
    assert all(_tree_digest(ckpts / name) == digest for name, digest in kept.items())  # untouched
    _assert_same_run(run, straight)


def test_nan_stops_the_run_then_a_corrupt_checkpoint_is_refused_or_skipped(tmp_path, straight):
    spec, run = _spec(tmp_path), tmp_path / "run"
    stopped = run_driver("run", str(spec), "--run-dir", str(run), PHI4_TEST_FAULT="nan-loss:7")
    assert stopped.returncode == 4, stopped.stderr
    record = orjson.loads((run / "pretrain" / "nonfinite.json").read_bytes())
    assert record["step"] == 7 and record["resumes_from"] == "step-6"
    rank = record["ranks"][0]
    assert rank["batch"] == metrics(straight / "pretrain")[6]["batch"]  # the batch of step 7, named
    assert rank["nonfinite_grads"] and rank["loss"] == ["nan"]
    assert [r["step"] for r in metrics(run / "pretrain")] == list(range(1, 7))  # step 7 never applied
    assert ledger(run)["stages"]["pretrain"]["status"] == "failed"
    step6 = run / "pretrain" / "checkpoints" / "step-6"
    assert checkpoints.problems(step6) == []  # the last checkpoint is intact

    # Now that checkpoint goes bad on disk: the run refuses to resume from it...
    shard = next(step6.glob("*.distcp"))
    _flip_byte(shard)
    refused = run_driver("run", str(spec), "--run-dir", str(run))
    assert refused.returncode == 5
    message = refused.stderr.strip().splitlines()[-1]
    assert f"{shard}: sha256" in message and "refusing to resume" in message
    assert shard.exists()  # nothing moved or deleted without being asked

    # ...unless the spec asks to fall back: then it resumes from step-4 and ends as if nothing happened.
    fallback = run_driver("run", str(spec), "--run-dir", str(run), "--set", 'checkpoint.on_corrupt="previous"')
    assert fallback.returncode == 0, fallback.stderr
    assert "checkpoint step-6 is corrupt" in fallback.stderr
    assert any(q.name.startswith("step-6.corrupt") for q in (run / "pretrain" / "checkpoints-quarantine").iterdir())
    _assert_same_run(run, straight)
    changes = ledger(run)["spec_changes"][-1]["changes"]
    assert changes == ['checkpoint.on_corrupt: "fail" -> "previous"']  # a safe change, recorded


def test_disk_full_then_an_inf_gradient(tmp_path, straight):
    spec, run = _spec(tmp_path), tmp_path / "run"
    full = run_driver("run", str(spec), "--run-dir", str(run), PHI4_TEST_FAULT="enospc:6")
    assert full.returncode == 5, full.stderr
    message = full.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint" in message and "step-6" in message and "No space left on device" in message
    assert "(the disk is full: " in message
    assert "resumes from step-4" in message
    assert not (run / "pretrain" / "checkpoints" / "step-6" / "manifest.json").exists()

    stopped = run_driver("run", str(spec), "--run-dir", str(run), PHI4_TEST_FAULT="inf-grad:9")
    assert stopped.returncode == 4
    assert stopped.stderr.strip().splitlines()[-1].startswith("phi4-engine: error: non-finite loss or gradient at step 9")
    record = orjson.loads((run / "pretrain" / "nonfinite.json").read_bytes())
    rank = record["ranks"][0]
    assert all(isinstance(v, float) for v in rank["loss"])  # the loss was finite: the gradient alone
    assert len(rank["nonfinite_grads"]) == 1 and record["resumes_from"] == "step-8"

    again = run_driver("run", str(spec), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    _assert_same_run(run, straight)


def test_a_fault_before_the_first_checkpoint_restarts_the_stage_cleanly(tmp_path, straight):
    """Stopped at step 1, before any checkpoint: the rerun starts the stage over, and the first
    attempt's step leaves no trace (metrics, TensorBoard) — found by bench/faults.py."""
    spec, run = _spec(tmp_path), tmp_path / "run"
    stopped = run_driver("run", str(spec), "--run-dir", str(run), PHI4_TEST_FAULT="nan-loss:2")
    assert stopped.returncode == 4, stopped.stderr
    assert [r["step"] for r in metrics(run / "pretrain")] == [1]
    again = run_driver("run", str(spec), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    _assert_same_run(run, straight)


# -- the manifest itself, on a small committed checkpoint (no training) -------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    model = model_spec("debug", vocab_size=64, rope_theta=10_000.0, max_seq_len=32).model.build()
    return save_weights(model.state_dict(), tmp_path / "step-0")


def _shard(folder: Path) -> Path:
    return next(folder.glob("*.distcp"))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: _flip_byte(_shard(f)), "sha256"),
        (lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:-7]), "bytes, manifest.json says"),
        (lambda f: (f / ".metadata").unlink(), ".metadata: missing"),
        (lambda f: (f / "stray.bin").write_bytes(b"x"), "stray.bin: not listed"),
        (lambda f: (f / "manifest.json").write_bytes(b"{not json"), "unreadable manifest"),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "extra-file", "bad-manifest"],
)
def test_damage_is_named_by_file_before_loading(saved, damage, expected):
    assert checkpoints.problems(saved) == []
    damage(saved)
    with pytest.raises(CheckpointError, match=expected):
        checkpoints.verify(saved)
    model = model_spec("debug", vocab_size=64, rope_theta=10_000.0, max_seq_len=32).model.build()
    with pytest.raises(CheckpointError, match=expected):
        load_model_weights(model, saved)


def test_uncommitted_checkpoints_are_not_loaded_or_counted(saved, tmp_path):
    (saved / "manifest.json").unlink()
    assert "never committed" in checkpoints.problems(saved)[0]
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_weights({"w": torch.full((2,), float(step))}, folder / f"step-{step}")
    (folder / "step-6" / "manifest.json").unlink()  # the newest one is still being written
    deleted = checkpoints.purge(folder, keep=2)
    assert [p.name for p in deleted] == []  # two committed ones: both kept, the torn one left alone
    save_weights({"w": torch.zeros(2)}, folder / "step-8")
    assert [p.name for p in checkpoints.purge(folder, keep=2)] == ["step-2"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-4", "step-6", "step-8"]


def test_an_inf_gradient_on_one_rank_stops_every_rank(tmp_path):
    from tests.reliability.conftest import fork_server
    from tests.reliability.driver import nonfinite_rank

    ctx = fork_server()
    procs = [ctx.Process(target=nonfinite_rank, args=(rank, str(tmp_path / "init"), str(tmp_path), str(tmp_path / f"rank{rank}")))
             for rank in range(2)]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    outcomes = [(tmp_path / f"rank{rank}").read_text() for rank in range(2)]
    assert all(o.startswith("stopped: non-finite loss or gradient at step 5") for o in outcomes), outcomes
    record = orjson.loads((tmp_path / "nonfinite.json").read_bytes())
    assert [r["nonfinite_grads"] for r in record["ranks"]] == [[], ["weight"]]  # rank 1 named, by rank


# -- a real full disk: the run directory on a tmpfs too small for the whole run ------------------


@pytest.fixture
def small_disk(tmp_path, straight):
    """A tmpfs mounted for the test, sized from the uninterrupted run so that checkpoint step-6
    cannot fit: everything the run writes up to step-4's checkpoint, plus half a checkpoint.
    Yields (mount point, bytes to grow by to fit the whole run)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI and the dev container run as root)")
    page = 4096
    pages = lambda p: -(-p.stat().st_size // page) * page  # noqa: E731 (tmpfs allocates whole pages)
    ckpts = straight / "pretrain" / "checkpoints"
    others = sum(pages(p) for p in straight.rglob("*") if p.is_file() and ckpts not in p.parents)
    per_ckpt = {d.name: sum(pages(p) for p in d.rglob("*") if p.is_file()) for d in ckpts.iterdir()}
    size = others + per_ckpt["step-2"] + per_ckpt["step-4"] + per_ckpt["step-6"] // 2
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount, sum(per_ckpt.values()) + others
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_really_full_disk(tmp_path, small_disk, straight):
    """No injection: the kernel says ENOSPC. One line naming the folder (exit 5), no half
    checkpoint marked complete, the ledger still written; once there is room the same command
    finishes exactly like the uninterrupted run."""
    import subprocess

    mount, whole = small_disk
    spec, run = _spec(tmp_path), mount / "run"
    full = run_driver("run", str(spec), "--run-dir", str(run))
    assert full.returncode == 5, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1, full.stderr  # no traceback
    # torch's serializer reports the short write as "unexpected pos"; the engine says what it means
    assert "could not write checkpoint" in lines[0] and "(the disk is full: " in lines[0], lines[0]
    assert ledger(run)["stages"]["pretrain"]["status"] == "failed"
    ckpts = run / "pretrain" / "checkpoints"
    complete = sorted(p.name for p in ckpts.iterdir() if (p / "manifest.json").exists())
    assert complete and all(checkpoints.problems(ckpts / name) == [] for name in complete)
    assert f"resumes from {complete[-1]}" in lines[0]

    subprocess.run(["mount", "-o", f"remount,size={whole * 2}", str(mount)], check=True)  # room made
    again = run_driver("run", str(spec), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    _assert_same_run(run, straight)


class _FullDiskSpec(StageSpec):
    kind: Literal["full-disk"]


class _FullDiskStage:
    """A stage whose checkpoint write failed (what ``_save`` raises on a full disk)."""

    def __init__(self, spec: _FullDiskSpec, ctx) -> None:
        pass

    def run(self) -> dict:
        raise CheckpointError("could not write checkpoint step-6: OSError: no space")


class _FullDiskPlugin:
    __name__ = "full-disk-stage"

    @hookimpl
    def phi4_register_stages(self, register):
        register("full-disk", _FullDiskSpec, _FullDiskStage)


def test_a_failure_the_ledger_cannot_record_keeps_its_own_message(tmp_path, monkeypatch):
    """When even the ledger cannot be written (the disk is still full), the user gets the first
    error, told that the ledger still says running (a rerun resumes the stage as after a kill)."""
    write_ledger = RunDir.write_ledger

    def full_when_failing(self, ledger):
        if any(entry.get("status") == "failed" for entry in ledger["stages"].values()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_ledger(self, ledger)

    monkeypatch.setattr(RunDir, "write_ledger", full_when_failing)
    spec = {"version": 1, "name": "full", "seed": 0, "model": {"flavor": "debug"},
            "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048}, "stages": [{"kind": "full-disk", "name": "s"}]}  # fmt: skip
    with pytest.raises(CheckpointError) as raised:
        Engine(spec, plugins=[_FullDiskPlugin()], run_dir=tmp_path / "run").run()
    assert str(raised.value) == (
        "could not write checkpoint step-6: OSError: no space (the ledger could not record the failure: No "
        "space left on device; it still says running, and a rerun resumes the stage as after a kill)"
    )
    assert ledger(tmp_path / "run")["stages"]["s"]["status"] == "running"
