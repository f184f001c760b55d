"""The sandbox for model-written code: each hostile program gets its verdict AND leaves the host as
it was (no process, file, connection or secret escapes). Layers are also checked one at a time,
so a broken kernel layer is not hidden by the audit hook (and the other way round)."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from phi4_engine.sandbox import LAYERS, SandboxError, SandboxResult, run_python

KERNEL = {"netns", "pidns", "mountns", "uid", "rlimits"}  # everything but the audit hook
HOOK_ONLY = {"rlimits", "audit"}  # what a non-root machine gets


@pytest.fixture(scope="module")
def available() -> frozenset[str]:
    return frozenset(run_python("pass").layers)


def need(available: frozenset[str], *layers: str) -> None:
    """As root (developers, CI) every layer must work: a missing one is a failure. Without root
    the kernel layers cannot exist, and only then is a test that needs them skipped."""
    missing = set(layers) - available
    if not missing:
        return
    if os.geteuid() == 0:
        pytest.fail(f"sandbox layers missing although running as root: {sorted(missing)}")
    pytest.skip(f"needs root for sandbox layers {sorted(missing)}")


_BEFORE: set[int] = set()
"""Children this test process already had before the test ran (e.g. a multiprocessing
forkserver left by an earlier test in the session): not the sandbox's doing."""


def _children() -> set[int]:
    me, out = os.getpid(), set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[1]) == me:
                    out.add(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.fixture(autouse=True)
def _note_existing_children():
    _BEFORE.clear()
    _BEFORE.update(_children())


def leftovers(result: SandboxResult) -> list[str]:
    """Processes still alive from a run: in its session, with its uid, or new children of this test."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            state, ppid, _pgrp, session = stat.rsplit(b")", 1)[1].split()[:4]
            uid = next(int(line.split()[1]) for line in Path(f"/proc/{name}/status").read_text().splitlines()
                       if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        mine = int(ppid) == me and int(name) not in _BEFORE
        if state == b"Z" and not mine:
            continue  # dead, waiting for init to reap it
        if mine or int(session) == result.session or (result.uid is not None and uid == result.uid):
            found.append(f"{name} {stat[:80]!r}")
    return found


def test_good_code_runs_in_a_fresh_empty_directory_that_is_removed():
    code = (
        "import os, json, fractions, statistics\n"
        "print(json.dumps([os.getcwd(), os.listdir('.'), os.environ['HOME'], str(fractions.Fraction(2, 4))]))\n"
        "open('scratch.txt', 'w').write('allowed inside the work directory')\n"
        "print(statistics.mean([1, 2, 3]))"
    )
    r = run_python(code)
    assert r.verdict == "ok", r.stderr
    assert r.returncode == 0 and not r.truncated
    cwd, listing, home, half = __import__("json").loads(r.stdout.splitlines()[0])
    assert listing == [] and home == cwd and half == "1/2"
    assert r.stdout.splitlines()[1] == "2"
    assert not os.path.exists(cwd)
    assert {"rlimits", "audit"} <= set(r.layers)
    assert r.duration_s < 5
    assert leftovers(r) == []


def test_errors_and_exit_codes():
    assert run_python("1/0").verdict == "error"
    assert "ZeroDivisionError" in run_python("1/0").stderr
    assert run_python("def f(:").verdict == "error"
    assert run_python("import sys; sys.exit(3)").returncode == 3
    assert run_python("input()").verdict == "error"  # stdin is empty
    with pytest.raises(ValueError, match="unknown sandbox layers"):
        run_python("pass", layers={"seccomp"})
    # A broken sandbox is an error of the sandbox, never a verdict on the program…
    with pytest.raises(SandboxError, match="setup failed"):
        run_python("pass", python="/bin/false")
    # …and a program cannot pass itself off as one.
    spoof = "import sys\nprint('phi4-sandbox: setup failed', file=sys.stderr)\nsys.exit(87)"
    assert run_python(spoof).verdict == "error"


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_is_killed_at_the_timeout(code):
    start = time.monotonic()
    r = run_python(code, timeout_s=1)
    assert r.verdict == "timeout" and r.returncode is None
    assert time.monotonic() - start < 2.0  # timeout + 1 s
    assert leftovers(r) == []


def test_whole_process_group_is_killed_on_timeout_without_pid_namespace():
    # Children that stay in the group must die with it even when no PID namespace reaps them.
    code = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print('forked', flush=True)\n"
        "while True: pass\n"
    )
    r = run_python(code, timeout_s=1, allow_subprocess=True, layers={"rlimits", "audit"})
    assert r.verdict == "timeout"
    assert "forked" in r.stdout
    assert leftovers(r) == []


def test_fork_is_forbidden_by_default():
    r = run_python("import os\nwhile True: os.fork()")
    assert r.verdict == "forbidden"
    assert leftovers(r) == []


def test_fork_bomb_is_bounded_by_the_process_limit(available):
    need(available, "uid", "rlimits")
    count = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
    )
    r = run_python(count, max_processes=8, allow_subprocess=True, layers=KERNEL)
    assert r.verdict == "ok", r.stderr
    assert 0 < int(r.stdout) < 8
    assert leftovers(r) == []

    start = time.monotonic()
    bomb = run_python("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
                      timeout_s=1.5, max_processes=8, allow_subprocess=True, layers=KERNEL)
    assert bomb.verdict in ("timeout", "error", "killed")
    assert time.monotonic() - start < 3.5
    assert leftovers(bomb) == []


@pytest.fixture
def targets(tmp_path):
    """A file in the test's private tmp dir and one in a world-writable dir outside it."""
    world = Path(tempfile.mkdtemp(prefix="sandbox-world-"))
    world.chmod(0o777)
    yield [tmp_path / "escaped.txt", world / "escaped.txt"]
    shutil.rmtree(world)


@pytest.mark.parametrize("layers,verdicts", [
    (None, {"forbidden"}),
    (HOOK_ONLY, {"forbidden"}),  # the audit hook alone
    (KERNEL, {"error"}),  # read-only mounts and file permissions alone
])
def test_writing_outside_the_work_directory_leaves_no_file(targets, layers, verdicts, available):
    if layers is KERNEL:
        need(available, "mountns", "uid")
    for target in targets:
        for code in (f"open({str(target)!r}, 'w').write('pwned')",
                     f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
                     f"import shutil\nopen('x', 'w').write('pwned')\nshutil.copyfile('x', {str(target)!r})"):
            r = run_python(code, layers=layers)
            assert r.verdict in verdicts, (code, r.verdict, r.stderr)
            assert not target.exists(), code
    # a relative escape from the work directory
    name = f"sandbox-escape-{secrets.token_hex(4)}.txt"
    r = run_python(f"open('../{name}', 'w').write('pwned')", layers=layers)
    assert r.verdict in verdicts
    assert not (Path(tempfile.gettempdir()) / name).exists()


SECRET_PROBE = (
    "import os\n"
    "print(dict(os.environ))\n"
    "for pid in ['self', '1', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
    "    try:\n"
    "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
    "    except OSError as exc:\n"
    "        print(pid, exc)\n"
)


@pytest.mark.parametrize("layers", [None, HOOK_ONLY, KERNEL])
def test_environment_secrets_are_invisible(monkeypatch, layers, available):
    if layers is KERNEL:
        need(available, "uid", "pidns")
    secret = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    r = run_python(SECRET_PROBE, layers=layers)
    assert "OPENAI_API_KEY" not in r.stdout
    assert secret not in r.stdout and secret not in r.stderr
    assert "'PATH': '/usr/bin:/bin'" in r.stdout  # the probe did run
    if layers is not KERNEL:
        assert r.verdict == "forbidden"  # reading /proc/*/environ trips the hook


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("layers,verdicts", [
    (None, {"forbidden"}),
    (HOOK_ONLY, {"forbidden"}),  # the audit hook alone
    ({"netns", "rlimits"}, {"error"}),  # the empty network namespace alone
])
def test_sockets_reach_nothing(listener, layers, verdicts, available):
    if "netns" in (layers or ()):
        need(available, "netns")
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'exfiltrated')\n"
        "print('connected')\n"
    )
    r = run_python(code, layers=layers)
    assert r.verdict in verdicts, r.stderr
    assert "connected" not in r.stdout
    readable, _, _ = select.select([listener], [], [], 0.3)
    assert readable == [], "the listener received a connection"
    # and a raw socket without the convenience wrapper
    r = run_python(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))", layers=layers)
    assert r.verdict in verdicts
    assert select.select([listener], [], [], 0.1)[0] == []


@pytest.mark.parametrize("code", [
    "x = bytearray(8 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))",
])
def test_memory_bomb_is_stopped(code):
    r = run_python(code, memory_mb=256)
    assert r.verdict in ("memory", "error"), r.stderr
    assert r.duration_s < 5
    assert leftovers(r) == []
    assert run_python("print('host fine')").stdout == "host fine\n"


def test_huge_output_is_truncated_keeping_head_and_tail():
    r = run_python("import sys\nprint('x' * 10_000_000)\nprint('y' * 3_000_000, file=sys.stderr)\nprint('END')",
                   max_output_bytes=10_000)
    assert r.verdict == "ok"
    assert r.truncated
    assert len(r.stdout) < 10_200 and len(r.stderr) < 10_200
    assert r.stdout.startswith("xxxx") and r.stdout.endswith("END\n")
    assert "bytes truncated" in r.stdout


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.execv('/bin/true', ['true'])",
    "import ctypes",
    "print(open('/proc/self/environ').read())",
    "import os\nos.chdir('/')",
    "import os\nos.kill(os.getppid() or 1, 9)" if os.geteuid() else "import os\nos.kill(12345, 9)",
])
def test_forbidden_actions(code):
    r = run_python(code)
    assert r.verdict == "forbidden", (code, r.verdict, r.stderr)
    assert "phi4-sandbox: forbidden:" in r.stderr


def test_reported_layers_are_known_and_kernel_layers_work_as_root(available):
    assert set(available) <= set(LAYERS)
    assert {"rlimits", "audit"} <= available
    if os.geteuid() == 0 and "pidns" in available and "mountns" in available:
        r = run_python("import os\nprint(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getuid())")
        pid, visible, uid = r.stdout.split(" ", 1)[0], r.stdout.split(" [")[1].split("]")[0], r.stdout.split()[-1]
        assert pid == "1" and visible == "'1'"  # it sees only itself
        if "uid" in available:
            assert int(uid) == r.uid != 0
