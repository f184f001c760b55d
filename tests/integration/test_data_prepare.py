"""``phi4-engine data prepare``: the CLI, worker-count determinism, interruption, pretraining from shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi4_engine.data import Document
from phi4_engine.data.prepare import PrepareInput, prepare, write_shards
from phi4_engine.engine import Engine
from phi4_engine.tokenizer import build_phi4_mini
from tests.conftest import run_cli, tiny_pretrain_spec, write_spec


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_output_is_byte_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr("phi4_engine.data.prepare.CHUNK_CHARS", 20_000)  # many chunks in flight
    spec = write_spec(tmp_path / "spec.json", tiny_pretrain_spec())
    engine = Engine.from_file(spec)
    one, three = (prepare(engine, tmp_path / f"w{n}", workers=n, max_shard_tokens=9000) for n in (1, 3))
    assert one == three
    assert [len(s["shards"]) for s in one["sources"]] == [3, 5]
    assert _files(tmp_path / "w1") == _files(tmp_path / "w3")


class Interrupted:
    """Text documents, then Ctrl-C (KeyboardInterrupt) while reading document ``at``."""

    name = "web"

    def __init__(self, at):
        self.at = at

    def documents(self, start=0):
        for i in range(start, self.at + 1):
            if i == self.at:
                raise KeyboardInterrupt
            yield Document(id=str(i), text=f"document {i} " * 300)


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setattr("phi4_engine.data.prepare.CHUNK_CHARS", 20_000)
    tok = build_phi4_mini(2048)
    with pytest.raises(KeyboardInterrupt):
        write_shards([PrepareInput("web", "test", {}, Interrupted(400))], tok, tmp_path / "out", workers=2, max_shard_tokens=20_000)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_prepare_then_pretrain_from_shards(tmp_path):
    spec_data = tiny_pretrain_spec(steps=10)
    spec_data["stages"].insert(0, {**spec_data["stages"][0], "name": "warmup", "data": {"sources": [
        {"kind": "synthetic-code", "num_documents": 10}]}})
    spec = write_spec(tmp_path / "spec.json", spec_data)
    out = tmp_path / "shards"
    result = run_cli("data", "prepare", str(spec), "--out", str(out), "--stage", "pretrain", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "math: 300 documents" in result.stdout and "prose: 300 documents" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["origin"]["stage"] == "pretrain"
    assert [(s["name"], s["kind"]) for s in manifest["sources"]] == [("math", "synthetic-arithmetic"), ("prose", "synthetic-prose")]

    spec_data = tiny_pretrain_spec(steps=10)
    spec_data["stages"][0]["data"]["sources"] = [
        {"kind": "shards", "path": "shards", "source": "math", "weight": 0.5},
        {"kind": "shards", "path": "shards", "source": "prose", "weight": 0.5},
    ]
    spec = write_spec(tmp_path / "from-shards.json", spec_data)
    stage = Engine.from_file(spec, run_dir=tmp_path / "run").run().stages["pretrain"]
    assert stage.summary["steps"] == 10
    assert stage.metrics["loss_last"] < stage.metrics["loss_first"]
    drawn = {d["name"]: d["tokens"] for d in stage.summary["data"]}
    assert set(drawn) == {"math", "prose"} and abs(drawn["math"] / sum(drawn.values()) - 0.5) < 0.05


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_errors_are_one_line_exit_2(tmp_path):
    assert "spec file not found" in _one_line_error(
        run_cli("data", "prepare", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")))
    spec = write_spec(tmp_path / "spec.json", tiny_pretrain_spec())
    line = _one_line_error(run_cli("data", "prepare", str(spec), "--out", str(tmp_path / "o"), "--stage", "sft"))
    assert "--stage: no stage named 'sft' (stages: pretrain)" in line
    assert not (tmp_path / "o").exists()
