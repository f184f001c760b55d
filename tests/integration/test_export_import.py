"""`phi4-engine export` writes a Hugging Face folder; a stage's `init_from` starts from one."""

from __future__ import annotations

import json

import pytest

from phi4_engine.engine import Engine
from phi4_engine.errors import EngineError
from tests.conftest import run_cli, tiny_pretrain_spec, write_spec


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    spec = write_spec(tmp / "spec.json", tiny_pretrain_spec(steps=4))
    result = Engine.from_file(spec, run_dir=tmp / "run").run()
    out = run_cli("export", str(tmp / "run"), "--stage", "pretrain", "--format", "hf", "--out", str(tmp / "hf"))
    assert out.returncode == 0, out.stderr
    return tmp, result.stages["pretrain"].summary


def test_export_writes_a_phi3_folder(pretrained):
    tmp, _ = pretrained
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["tie_word_embeddings"] is False
    names = {p.name for p in (tmp / "hf").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert "chat_template" in json.loads((tmp / "hf" / "tokenizer_config.json").read_text())
    again = run_cli("export", str(tmp / "run"), "--out", str(tmp / "hf"))
    assert again.returncode == 2 and "Traceback" not in again.stderr  # never overwrites a folder


def test_a_stage_starts_from_an_exported_folder_bit_exactly(pretrained, tmp_path):
    tmp, pretrain = pretrained
    data = tiny_pretrain_spec(steps=2)
    data["name"] = "from-hf"
    data["stages"][0]["init_from"] = str(tmp / "hf")
    spec = write_spec(tmp_path / "spec.json", data)
    result = Engine.from_file(spec, run_dir=tmp_path / "run").run()
    summary = result.stages["pretrain"].summary
    assert summary["init_weights_sha256"] == pretrain["weights_sha256"]  # fp32 export → import is exact
    assert (tmp_path / "run" / "pretrain" / "init" / "checkpoint").is_dir()


def test_init_from_a_model_of_another_shape_is_refused_in_one_line(pretrained, tmp_path):
    tmp, _ = pretrained
    data = tiny_pretrain_spec(steps=2)
    data["model"] = {"flavor": "tiny"}
    data["stages"][0]["init_from"] = str(tmp / "hf")
    spec = write_spec(tmp_path / "spec.json", data)
    with pytest.raises(EngineError, match="holds a debug model with vocab"):
        Engine.from_file(spec, run_dir=tmp_path / "run").run()
