"""Run model-written Python in a throw-away child process: :func:`run_python`.

Why: Pivotal Token Search (and any verifier with ``tests``) executes thousands of programs that a
language model wrote. Most are harmless; some loop forever, allocate without bound, fork, print
gigabytes, or — because the model imitates code it has seen — delete files, read credentials or
open network connections. This module keeps such programs from hurting the training host and from
being mistaken for passing ones. It is **defence in depth for a training pipeline, not a hardened
jail**: it assumes code that is careless or mildly adversarial, not an attacker with a kernel
exploit.

Layers (each run reports the ones actually active in :attr:`SandboxResult.layers`; a layer that
cannot be set up is skipped and named in :attr:`SandboxResult.notes` and the log):

``netns``    (root) a new, empty network namespace: no interface but a down loopback, so nothing
             can be reached, not even the host's ``127.0.0.1``.
``pidns``    (root) a new PID namespace with the program as its init and a fresh ``/proc``: it sees
             only its own processes, and when it exits or is killed the kernel kills and reaps
             every process it started, including ones that left the session.
``mountns``  (root) a private mount namespace in which every mount is read-only except the work
             directory; directories the interpreter needs but an unprivileged user cannot reach
             (e.g. a pyenv under ``/root``) are exposed read-only on a tmpfs that hides the rest.
``ipcns``, ``utsns`` (root) private SysV IPC and hostname.
``uid``      (root) the program runs as a fresh unprivileged uid/gid (one per run, no supplementary
             groups, ``no_new_privs``), so file permissions apply to it, it cannot signal or trace
             host processes, and ``RLIMIT_NPROC`` (counted per real uid) bounds its processes.
``rlimits``  address space (``memory_mb``), CPU seconds, file size, process count (only meaningful
             with ``uid``: as root, and for a shared uid, the kernel does not enforce or shares it),
             open files, no core dumps.
``audit``    a :func:`sys.addaudithook` hook installed before the program starts that ends it with
             exit code :data:`FORBIDDEN_EXIT` (verdict ``"forbidden"``) on sockets, process
             creation (``fork``/``exec``/``subprocess``/``os.system``, unless ``allow_subprocess``),
             signals to other processes, ``ctypes``, writes/renames/deletes outside the work
             directory, reads of secret-looking paths (``/proc/*/environ``, ``~/.ssh``…), and the
             ``gc`` introspection that would reach the hook itself. ``AF_UNIX`` sockets may be
             created (``socketpair`` for asyncio) but never connected or bound.

Always: a new session and process group (killed as a whole with ``SIGKILL`` on timeout; any
straggler in that session or with the run's uid is killed and the group reaped), an isolated
interpreter (``python -I -S -B``: no site-packages, no ``PYTHON*`` variables, no user site), a new
empty working directory that is deleted afterwards, and an environment holding only ``PATH``,
``LANG``, ``HOME`` and ``TMPDIR`` (the last two are the work directory): no secret in the
parent's environment reaches the child. Output is captured through pipes and truncated (head and
tail kept) to ``max_output_bytes`` per stream; the rest is drained and dropped.

Verdicts: ``ok`` (exit status 0), ``error`` (any other exit status, e.g. an uncaught exception),
``timeout`` (wall clock or CPU limit), ``memory`` (``MemoryError``/``ENOMEM`` under the address-space
limit), ``killed`` (another signal: a crash, the file-size limit…), ``forbidden`` (the audit hook).

How: the host starts ``python -I -S -B -c BOOTSTRAP`` as a session leader with the program on
stdin. The bootstrap (a few dozen lines, below) runs as the host's user: it unshares the
namespaces, sets up the mounts, forks, and stays behind as a supervisor that reports the
program's wait status and CPU time over a private pipe; the child mounts its ``/proc``, sets the
rlimits, drops to the run's uid, installs the audit hook and executes the program as
``__main__``. Both die with the host (``PR_SET_PDEATHSIG``). This is done in the child rather
than in ``subprocess``'s ``preexec_fn`` because ``preexec_fn`` is unsafe in a process with threads
and :meth:`~phi4_engine.plugins.verifiers.PythonTests.verify_many` runs sandboxes from a thread
pool. A run costs about 40 ms of overhead (two cores, all layers); runs parallelize.

The program sees the standard library of the host's interpreter and nothing else (no
site-packages). As the init of its PID namespace it ignores signals it has no handler for, so
the soft CPU limit (``SIGXCPU``) does not stop it; the hard one (``SIGKILL``) one second later does.

Limits, honestly:

* Without root (a developer laptop), only the session kill, the rlimits other than
  ``RLIMIT_NPROC``, the scrubbed environment and the audit hook apply; a process that the
  program starts (with ``allow_subprocess``) and that leaves the session survives the run. The audit hook is a
  tripwire for ordinary code, not a boundary (:pep:`578` says so): a determined program can get
  around it (e.g. by monkeypatching what the hook calls, or ``_posixsubprocess.fork_exec``).
  The kernel layers above are the real boundaries, and they need root.
* Nothing limits total disk use in the work directory beyond ``RLIMIT_FSIZE`` per file and the
  time budget; no seccomp filter; the kernel attack surface is the host's.
* Reading world-readable files (``/etc/passwd``, the repository if it is world-readable) is
  allowed; only secret-looking paths are refused by the hook.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

VERDICTS = ("ok", "error", "timeout", "memory", "killed", "forbidden")
"""Every value :attr:`SandboxResult.verdict` can take."""

LAYERS = ("netns", "pidns", "mountns", "ipcns", "utsns", "uid", "rlimits", "audit")
"""Every isolation layer :func:`run_python` knows (see the module docstring)."""

FORBIDDEN_EXIT = 86
"""Exit status the audit hook ends a program with; together with :data:`FORBIDDEN_MARKER` on stderr
it makes the verdict ``"forbidden"``."""

FORBIDDEN_MARKER = "phi4-sandbox: forbidden:"
_SETUP_EXIT = 87  # the bootstrap failed before the program started: an infrastructure error

_UID_BASE = 0x71000000  # above systemd's container ranges, below its reserved ones
_UID_SPAN = 1 << 24
_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()
_warned: set[str] = set()


class SandboxError(RuntimeError):
    """The sandbox itself could not run the program (not a verdict about the program)."""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program."""

    verdict: str
    """One of :data:`VERDICTS`."""
    returncode: int | None
    """The program's exit status (negative: killed by that signal; ``None``: killed on timeout)."""
    stdout: str
    """Captured standard output, truncated to about ``max_output_bytes`` (head and tail kept)."""
    stderr: str
    """Captured standard error, truncated the same way (the traceback is at the tail)."""
    duration_s: float
    """Wall-clock seconds from start to the last process reaped."""
    truncated: bool = False
    """Whether stdout or stderr lost bytes."""
    layers: tuple[str, ...] = ()
    """Isolation layers that were active (see :data:`LAYERS`)."""
    notes: tuple[str, ...] = ()
    """Why a requested layer is missing, and other remarks from the sandbox."""
    cpu_s: float | None = None
    """CPU seconds the program used (itself and reaped children), when known."""
    session: int = 0
    """Process id of the run's session leader: the session (and process group) id of the run."""
    uid: int | None = None
    """The unprivileged uid the program ran as, when the ``uid`` layer was active."""

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


# ---------------------------------------------------------------------------------------------
# The child side lives in sandbox_child.py (a program, not a module): read once, run with -c.

_BOOTSTRAP = Path(__file__).with_name("sandbox_child.py").read_text()


# ---------------------------------------------------------------------------------------------
# The parent side.


def _allocate_uid() -> int:
    with _uids_lock:
        while True:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


class _Capture:
    """Keeps the first and last bytes of a stream within ``limit`` and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.tail_limit = limit // 4
        self.head_limit = limit - self.tail_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        if not self.truncated:
            return (self.head + self.tail).decode("utf-8", "replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return (self.head.decode("utf-8", "replace") + f"\n[... {dropped} bytes truncated ...]\n"
                + self.tail.decode("utf-8", "replace"))


def _processes_of(session: int, uid: int | None) -> list[int]:
    """Live pids (not ours, not zombies) in ``session`` or owned by ``uid``, from ``/proc``."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue  # already dead; its parent (or init) reaps it
            if int(fields[3]) == session:
                found.append(int(name))
                continue
            if uid is not None:
                with open(f"/proc/{name}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Uid:"):
                            if int(line.split()[1]) == uid:
                                found.append(int(name))
                            break
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return found


def _kill_all(session: int, uid: int | None) -> None:
    """SIGKILL the run's process group, then anything left in its session or with its uid."""
    try:
        os.killpg(session, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(50):
        left = _processes_of(session, uid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _work_root() -> str | None:
    """Where work directories go: the usual temp dir, or ``/tmp`` when an unprivileged uid could
    not reach the usual one (e.g. ``TMPDIR`` under ``/root``)."""
    base = os.path.realpath(tempfile.gettempdir())
    if os.geteuid() != 0:
        return None
    parts = base.split("/")
    for i in range(2, len(parts) + 1):
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            return "/tmp"
    return None


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (so its pid stays taken)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):  # a program may leave directories without permissions
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        func(p)

    shutil.rmtree(path, onerror=retry)


def _note_once(note: str) -> None:
    if note not in _warned:
        _warned.add(note)
        log.warning("sandbox: %s", note)


def run_python(
    code: str,
    *,
    timeout_s: float = 5,
    memory_mb: int = 256,
    max_processes: int = 16,
    max_output_bytes: int = 64_000,
    file_mb: int = 16,
    allow_subprocess: bool = False,
    layers: frozenset[str] | set[str] | tuple[str, ...] | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` of a fresh, isolated interpreter and report what happened.

    ``timeout_s`` is wall-clock (CPU time is limited to about the same); ``memory_mb`` caps the
    address space; ``max_processes`` caps processes and threads (with the ``uid`` layer);
    ``file_mb`` caps each file written; ``max_output_bytes`` caps what is kept of stdout and of
    stderr. ``allow_subprocess`` lets the program fork and exec (still inside every other layer).
    ``layers`` selects isolation layers (default: all of :data:`LAYERS` this machine supports;
    tests pass subsets to check one layer alone). Thread-safe: run many at once from threads.
    Raises :class:`SandboxError` only when the sandbox itself fails, never for the program.
    """
    wanted = set(LAYERS if layers is None else layers)
    unknown = wanted - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown sandbox layers: {sorted(unknown)} (known: {', '.join(LAYERS)})")
    if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0 or max_output_bytes <= 0 or file_mb <= 0:
        raise ValueError("timeout_s, memory_mb, max_processes, max_output_bytes and file_mb must be positive")

    uid = _allocate_uid()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="phi4-sandbox-", dir=_work_root()))
    status_r, status_w = os.pipe()
    args = {
        "setup_exit": _SETUP_EXIT,
        "forbidden_exit": FORBIDDEN_EXIT,
        "forbidden_marker": FORBIDDEN_MARKER.encode().hex(),
        "host": os.getpid(),
        "status_fd": status_w,
        "workdir": workdir,
        "layers": ",".join(sorted(wanted)),
        "uid": uid,
        "cpu_s": math.ceil(timeout_s) + 1,
        "memory_bytes": memory_mb << 20,
        "file_bytes": file_mb << 20,
        "nproc": max_processes,
        "allow_subprocess": int(allow_subprocess),
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": os.environ.get("LANG") or "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    start = time.monotonic()
    try:
        try:
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, *(f"{k}={v}" for k, v in args.items())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=workdir,
                start_new_session=True, pass_fds=(status_w,), close_fds=True,
            )
        except OSError as exc:
            raise SandboxError(f"cannot start the sandbox interpreter: {exc}") from exc
        finally:
            os.close(status_w)
        try:
            return _supervise(proc, code, status_r, start, timeout_s, max_output_bytes, uid)
        finally:
            if proc.poll() is None:  # only on an exception above
                _kill_all(proc.pid, uid)
                proc.wait()
    finally:
        os.close(status_r)
        _remove_tree(workdir)
        with _uids_lock:
            _uids_in_use.discard(uid)


def _supervise(proc: subprocess.Popen, code: str, status_r: int, start: float, timeout_s: float,
               max_output_bytes: int, uid: int) -> SandboxResult:
    try:
        proc.stdin.write(code.encode("utf-8", "surrogatepass"))  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except BrokenPipeError:
        pass
    out, err, status = _Capture(max_output_bytes), _Capture(max_output_bytes), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ, err)  # type: ignore[arg-type]
    sel.register(status_r, selectors.EVENT_READ, status)
    deadline = start + timeout_s
    timed_out = False
    exited_at: float | None = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline and not timed_out:
            timed_out = True
            _kill_all(proc.pid, uid)
            deadline = now + 2.0  # to drain what is left
        elif timed_out and now >= deadline:
            break
        if exited_at is None and _exited(proc.pid):
            exited_at = now
        elif exited_at is not None and now - exited_at > 0.5:
            _kill_all(proc.pid, uid)  # stragglers keep the pipes open (no PID namespace)
            exited_at = now
        for key, _ in sel.select(timeout=min(0.1, max(deadline - now, 0.001))):
            fd = key.fd
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            if isinstance(key.data, _Capture):
                key.data.add(data)
            else:
                key.data.extend(data)
    sel.close()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    wait_until = max(deadline, time.monotonic() + 0.1)
    while not _exited(proc.pid):
        if time.monotonic() >= wait_until:
            timed_out = True
            break
        time.sleep(0.002)
    # Still unreaped, so its pid (the session id) cannot be reused while we sweep.
    _kill_all(proc.pid, uid)
    proc.wait()
    duration = time.monotonic() - start

    layers, notes, exit_status, cpu, run_uid, ready = [], [], None, None, None, False
    for line in status.decode("utf-8", "replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "ready":
            ready = True
        elif word == "layer":
            layers.append(rest)
        elif word in ("note", "info"):
            notes.append(rest)
            if word == "note":
                _note_once(rest)
        elif word == "uid":
            run_uid = int(rest)
        elif word == "exit":
            raw, cpu_text, _rss = rest.split()
            exit_status, cpu = int(raw), float(cpu_text)
    stderr = err.text()
    if exit_status is not None:
        returncode: int | None = os.waitstatus_to_exitcode(exit_status)
    else:
        returncode = None if timed_out else proc.returncode
    if not ready and not timed_out:
        raise SandboxError(f"sandbox setup failed (exit status {returncode}): {stderr.strip()[-2000:]}")
    verdict = _verdict(returncode, stderr, timed_out, cpu, timeout_s)
    return SandboxResult(
        verdict=verdict, returncode=returncode, stdout=out.text(), stderr=stderr, duration_s=duration,
        truncated=out.truncated or err.truncated, layers=tuple(layers), notes=tuple(notes), cpu_s=cpu,
        session=proc.pid, uid=run_uid,
    )


def _verdict(returncode: int | None, stderr: str, timed_out: bool, cpu: float | None, timeout_s: float) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode == FORBIDDEN_EXIT and FORBIDDEN_MARKER in stderr:
        return "forbidden"
    tail = stderr[-2000:]
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= math.ceil(timeout_s)):
            return "timeout"
        return "killed"
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "memory"
    return "error"
