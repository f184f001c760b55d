"""The ``openai-chat`` judge against a real HTTP server on 127.0.0.1 with scripted behaviours.

The server implements ``POST /v1/chat/completions``; what it does is chosen by a ``case:<name>``
marker inside the response being judged (it reaches the server in the user message), and per-case
counters script sequences such as "429, then success".
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from phi4_engine import __version__
from phi4_engine.errors import EngineError
from phi4_engine.judging import JudgeFailure, JudgeItem, Verdict, VerdictCache
from phi4_engine.plugins.judges import RUBRIC, OpenAIChatJudge, OpenAIChatSpec

KEY_ENV = "PHI4_TEST_JUDGE_KEY"
FAKE_KEY = "sk-test-FAKE-9f8e7d6c5b4a"
GOOD = {"faults": "none", "discussion": "fine", "accuracy": 4, "style": 5, "detail": 3}
PLUGIN = f"plugin 'judges' (phi4-engine {__version__})"


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Handler(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _done(self) -> None:
        """The request stops counting as in flight BEFORE its reply is written: once the client
        has the reply it may send the next request, which must not overlap this one's count."""
        if getattr(self, "_inflight", False):
            self._inflight = False
            with self.state.lock:
                self.state.inflight -= 1

    def _send(self, status: int, payload: dict | str, headers: dict[str, str] | None = None) -> None:
        self._done()
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _reply(self, content: str) -> None:
        self._send(200, {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})

    def do_POST(self) -> None:
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        case = re.search(r"case:([\w-]+)", body["messages"][-1]["content"]).group(1)
        auth = self.headers.get("Authorization")
        with st.lock:
            n = st.counts[case] = st.counts.get(case, 0) + 1
            st.auth.append(auth)
            st.bodies.append(body)
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        self._inflight = True
        try:
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": "no such path"})
            elif case == "valid":
                self._reply(json.dumps(GOOD))
            elif case == "fenced":
                self._reply("```json\n" + json.dumps(GOOD, indent=1) + "\n```")
            elif case == "slow":
                time.sleep(1.0)
                self._reply(json.dumps(GOOD))
            elif case == "busy":
                time.sleep(0.15)
                self._reply(json.dumps(GOOD))
            elif case == "notjson":
                self._reply("The response is good. Accuracy 4/5.")
            elif case == "missing":
                self._reply(json.dumps({"accuracy": 4, "style": 5}))
            elif case == "seven":
                self._reply(json.dumps({**GOOD, "accuracy": 7}))
            elif case == "notcompletion":
                self._send(200, "<html>gateway</html>")
            elif case == "echo":  # a misbehaving server echoes the request's headers
                self._reply(f"I saw: {auth}")
            elif case == "echo500":
                self._send(500, {"error": f"bad auth {auth}"})
            elif case == "429":
                if n == 1:
                    self._send(429, {"error": "rate limited"}, {"Retry-After": "1"})
                else:
                    self._reply(json.dumps(GOOD))
            elif case == "500x2":
                self._send(500, {"error": "flaky"}) if n <= 2 else self._reply(json.dumps(GOOD))
            elif case == "500":
                self._send(500, {"error": "upstream exploded"})
            elif case == "400":
                self._send(400, {"error": "bad request"})
            else:
                self._send(418, {"error": f"unknown case {case}"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout case)
        finally:
            self._done()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def state(server) -> State:
    st = State()
    Handler.state = st
    return st


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)


def make_judge(server, **overrides) -> OpenAIChatJudge:
    fields = {"kind": "openai-chat", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
              "model": "judge-test", "api_key_env": KEY_ENV, "timeout_s": 2.0, "max_retries": 2,
              "backoff_s": 0.02, "max_backoff_s": 2.0, "concurrency": 3, **overrides}
    return OpenAIChatJudge(OpenAIChatSpec.model_validate(fields))


def item(case: str, i: int = 0) -> JudgeItem:
    return JudgeItem([{"role": "user", "content": f"question {i}"}], f"case:{case} response {i}", {"answer": "42"})


def test_valid_scores_request_shape_and_auth_header(server, state):
    judge = make_judge(server)
    results = judge.score_many([item("valid"), item("fenced")])
    assert all(isinstance(r, Verdict) for r in results)
    assert results[0].scores == {"accuracy": 4.0, "style": 5.0, "detail": 3.0}
    assert results[1].scores == results[0].scores and results[1].raw.startswith("```json")
    assert state.auth == [f"Bearer {FAKE_KEY}"] * 2
    body = state.bodies[0]
    assert body["model"] == "judge-test" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": RUBRIC}
    assert "question 0" in body["messages"][1]["content"] and "42" in body["messages"][1]["content"]


def test_slow_reply_is_retried_then_a_timeout_failure(server, state):
    judge = make_judge(server, timeout_s=0.3)
    [result] = judge.score_many([item("slow")])
    assert isinstance(result, JudgeFailure) and result.kind == "timeout"
    assert state.counts["slow"] == 3  # first attempt + max_retries
    assert PLUGIN in result.message and "after 3 attempts" in result.message


def test_malformed_replies_are_quarantined_never_retried_or_scored(server, state, tmp_path):
    cases = ["notjson", "missing", "seven", "notcompletion"]
    with VerdictCache(tmp_path) as cache:
        results = cache.score(make_judge(server), [item(c) for c in cases])
        assert cache.stats() == {"asked": 4, "cached": 0, "ok": 0, "malformed": 4, "failed": 0}
        assert len(cache) == 0
    assert all(isinstance(r, JudgeFailure) and r.kind == "malformed" for r in results)
    assert state.counts == {c: 1 for c in cases}
    assert "'detail' is missing" in results[1].message and "7 is not an integer in 1..5" in results[2].message
    lines = (tmp_path / "judge-quarantine.jsonl").read_text().splitlines()
    quarantine = {json.loads(x)["response"].split()[0]: json.loads(x) for x in lines}  # completion order varies
    assert len(lines) == 4 and quarantine["case:notjson"]["raw"] == "The response is good. Accuracy 4/5."
    assert quarantine["case:notcompletion"]["raw"] == "<html>gateway</html>"
    assert quarantine["case:seven"]["kind"] == "malformed" and '"accuracy": 7' in quarantine["case:seven"]["raw"]
    assert not (tmp_path / "verdicts.jsonl").read_text()


def test_429_honours_retry_after_then_succeeds(server, state):
    start = time.monotonic()
    [result] = make_judge(server).score_many([item("429")])
    assert isinstance(result, Verdict)
    assert state.counts["429"] == 2
    assert time.monotonic() - start >= 1.0  # Retry-After: 1, while back-off alone is 0.02 s


def test_500_twice_then_success(server, state):
    [result] = make_judge(server).score_many([item("500x2")])
    assert isinstance(result, Verdict) and state.counts["500x2"] == 3


def test_500_always_is_an_http_failure_naming_the_plugin(server, state):
    [result] = make_judge(server).score_many([item("500")])
    assert isinstance(result, JudgeFailure) and result.kind == "http"
    assert PLUGIN in result.message and "HTTP 500" in result.message and "upstream exploded" in result.message
    assert state.counts["500"] == 3


def test_client_error_is_not_retried(server, state):
    [result] = make_judge(server).score_many([item("400")])
    assert isinstance(result, JudgeFailure) and result.kind == "http" and state.counts["400"] == 1


def test_concurrency_limit_is_respected(server, state):
    results = make_judge(server, concurrency=3).score_many([item("busy", i) for i in range(12)])
    assert all(isinstance(r, Verdict) for r in results)
    assert 2 <= state.max_inflight <= 3


def test_verdicts_are_cached_across_a_restart(server, state, tmp_path):
    items = [item("valid", i) for i in range(4)] + [item("500", 9)]
    with VerdictCache(tmp_path) as cache:
        cache.score(make_judge(server), items)
    assert state.counts == {"valid": 4, "500": 3}
    with VerdictCache(tmp_path) as cache:  # a resumed run: new judge, new cache instance
        results = cache.score(make_judge(server), items[:4])
        assert cache.stats() == {"asked": 0, "cached": 4, "ok": 0, "malformed": 0, "failed": 0}
    assert state.counts == {"valid": 4, "500": 3}  # the server saw no new request
    assert all(isinstance(r, Verdict) for r in results)


def test_api_key_is_never_written_or_reported(server, state, tmp_path, monkeypatch):
    judge = make_judge(server)
    with VerdictCache(tmp_path) as cache:
        results = cache.score(judge, [item("valid"), item("echo"), item("echo500"), item("seven")])
    assert state.auth and all(a == f"Bearer {FAKE_KEY}" for a in state.auth)
    assert [type(r) for r in results] == [Verdict, JudgeFailure, JudgeFailure, JudgeFailure]
    texts = [json.dumps(judge.spec.model_dump()), judge.version, repr(judge.spec)]
    texts += [f"{r.message} {r.raw}" for r in results if isinstance(r, JudgeFailure)]
    texts += [p.read_text() for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert "[REDACTED]" in (tmp_path / "judge-quarantine.jsonl").read_text()
    assert not [t for t in texts if FAKE_KEY in t]

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EngineError, match=KEY_ENV) as info:
        judge.score_many([item("valid", 1)])
    assert FAKE_KEY not in str(info.value)
