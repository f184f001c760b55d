"""Security: specs cannot execute code; checkpoints load without unpickling arbitrary objects;
secrets in the environment (judge API keys) never reach logs, the ledger, spec copies or
TensorBoard; model-written code runs only in the sandbox."""

from __future__ import annotations

import ast
import json
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from phi4_engine import checkpoints
from phi4_engine.engine import Engine
from phi4_engine.errors import CheckpointError
from phi4_engine.titan.generate import load_model_weights, save_weights
from phi4_engine.titan.phi4 import model_spec
from tests.conftest import REPO, run_cli, tiny_pretrain_spec, write_spec
from tests.reliability.conftest import CHAT, ledger

# -- specs are data ---------------------------------------------------------------------------


def test_spec_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    spec = write_spec(tmp_path / "spec.json", tiny_pretrain_spec(steps=2))
    assert run_cli("validate", str(spec), "--set", f"seed={payload}").returncode == 2  # not JSON: refused
    assert run_cli("validate", str(spec), "--set", f"name={json.dumps(payload)}").returncode == 2  # a string, and a bad name
    data = tiny_pretrain_spec(steps=2)
    data["stages"][0]["kind"] = "os.system"
    data["tokenizer"] = {"kind": payload}
    bad = run_cli("validate", str(write_spec(tmp_path / "bad.json", data)))
    assert bad.returncode == 2 and "unknown kind" in bad.stderr
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    extends = run_cli("validate", str(write_spec(tmp_path / "child.json", {"extends": "evil.py", **data})))
    assert extends.returncode == 2 and extends.stderr.count("\n") == 1
    assert not marker.exists()


# -- checkpoints are not pickles of arbitrary objects -------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(checkpoint: Path, marker: Path) -> None:
    """Replace the DCP metadata with a code-running pickle and re-sign the manifest (an attacker
    who can write the checkpoint can write its manifest too)."""
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    files = checkpoints.checkpoint_files(checkpoint)
    checkpoints.write_manifest(checkpoint, 0, checkpoints.hash_files(checkpoint, files))


def test_a_code_running_metadata_pickle_is_refused_by_generation(tmp_path):
    model = model_spec("debug", vocab_size=64, rope_theta=10_000.0, max_seq_len=32).model.build()
    folder = save_weights(model.state_dict(), tmp_path / "step-0")
    marker = tmp_path / "pwned"
    _tamper(folder, marker)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle posix\.system"):
        load_model_weights(model, folder)
    assert not marker.exists()


def test_a_code_running_metadata_pickle_is_refused_at_resume(tmp_path):
    data = tiny_pretrain_spec(steps=4)
    data["checkpoint"] = {"interval": 2, "keep_latest_k": 0}
    spec = write_spec(tmp_path / "spec.json", data)
    run = tmp_path / "run"
    Engine.from_file(spec, run_dir=run).run()
    marker = tmp_path / "pwned"
    _tamper(run / "pretrain" / "checkpoints" / "step-4", marker)
    book = ledger(run)
    book["stages"]["pretrain"]["status"] = "failed"  # as if it stopped after step 4: resume from it
    (run / "ledger.json").write_text(json.dumps(book))
    resumed = run_cli("run", str(spec), "--run-dir", str(run))
    assert resumed.returncode == 5 and "refusing to unpickle posix.system" in resumed.stderr
    assert resumed.stderr.strip().count("\n") == 0
    assert not marker.exists()


# -- secrets never persist ----------------------------------------------------------------------

SECRET = "sk-live-NEVER-LOG-7f3a9b2c1d"


class _EchoingJudge(BaseHTTPRequestHandler):
    """An OpenAI-style judge that answers every other request by echoing the request's
    Authorization header back (in a 200 reply and in a 500 error body)."""

    calls = 0

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        auth = self.headers.get("Authorization")
        if self.calls % 3 == 1:
            body, status = json.dumps({"error": f"bad auth {auth}"}), 500
        elif self.calls % 3 == 2:
            body, status = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"I saw {auth}"}}]}), 200
        else:
            scores = {"faults": "none", "discussion": f"fine", "accuracy": self.calls % 5 + 1, "style": 3, "detail": 3}
            body, status = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(scores)}}]}), 200
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echoing_judge():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_the_judge_api_key_appears_nowhere(tmp_path, echoing_judge, monkeypatch, capfd):
    monkeypatch.setenv("PHI4_TEST_SECRET_KEY", SECRET)
    data = {
        "version": 1, "name": "secrets", "seed": 0, "model": {"flavor": "debug"},
        "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048},
        "stages": [
            {"kind": "sft", "steps": 4, "seq_len": 128, "batch_size": 4, "lr": 0.003,
             "data": {"sources": [{**CHAT, "name": "chat", "num_documents": 100}]}},
            {"kind": "dpo-judge", "pairs": 2, "candidates": 2, "prompts_per_batch": 4, "max_new_tokens": 8,
             "seq_len": 96, "batch_size": 1, "lr": 1e-4, "prompts": [{**CHAT, "name": "prompts", "num_documents": 40}],
             "judge": {"kind": "openai-chat", "base_url": echoing_judge, "model": "judge", "max_retries": 0,
                       "api_key_env": "PHI4_TEST_SECRET_KEY", "timeout_s": 5.0}},
        ],
    }  # fmt: skip
    spec = write_spec(tmp_path / "spec.json", data)
    run = tmp_path / "run"
    Engine.from_file(spec, run_dir=run).run()
    assert _EchoingJudge.calls > 3  # the server did echo the key back, more than once
    quarantine = (run / "dpo-judge" / "data" / "judge-quarantine.jsonl").read_text()
    assert "bad auth" in quarantine and "I saw" in quarantine  # the echoes were kept, redacted
    out, err = capfd.readouterr()
    leaks = [str(p) for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [] and SECRET not in out + err
    assert "PHI4_TEST_SECRET_KEY" in (run / "spec.json").read_text()  # the spec names the variable only


# -- model-written code runs only in the sandbox -------------------------------------------------

# Modules allowed to execute code or start processes; everything else in the engine must not.
EXECUTORS = {"phi4_engine/sandbox.py", "phi4_engine/sandbox_child.py"}
# ...and the data preparation's tokenizer worker pool (it runs the engine's own functions).
PROCESS_POOLS = {"phi4_engine/data/prepare.py"}
UNPICKLERS = {"phi4_engine/titan/safe_metadata.py"}


def test_only_the_sandbox_executes_code_or_starts_processes():
    found = []
    for path in sorted([*REPO.glob("phi4_engine/**/*.py"), *REPO.glob("plugins/*.py"), *REPO.glob("stages/*.py")]):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                if name == "subprocess" and rel not in EXECUTORS or name == "multiprocessing" and rel not in EXECUTORS | PROCESS_POOLS:
                    found.append(f"{rel}:{node.lineno} imports {name}")
                if name in ("pickle", "marshal", "shelve", "dill") and rel not in UNPICKLERS:
                    found.append(f"{rel}:{node.lineno} imports {name}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval", "compile"):
                if rel not in EXECUTORS:
                    found.append(f"{rel}:{node.lineno} calls {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "execv", "execve", "fork", "spawnv"):
                if isinstance(node.value, ast.Name) and node.value.id == "os" and rel not in EXECUTORS:
                    found.append(f"{rel}:{node.lineno} uses os.{node.attr}")
    assert found == []
