"""The child side of :func:`phi4_engine.sandbox.run_python` — NOT imported.

The sandbox runs this file's text as ``python -I -S -B -c <text> key=value...`` with the program
on stdin and its settings (also the parent's exit-code constants) as ``key=value`` arguments.
Kept import-light (os, sys, ctypes): it is paid for on every run.
"""

import os, sys
A = dict(a.split("=", 1) for a in sys.argv[1:])
SETUP_EXIT = int(A["setup_exit"])
FORBIDDEN_EXIT = int(A["forbidden_exit"])
FORBIDDEN_MARKER = bytes.fromhex(A["forbidden_marker"]).decode()
STATUS = int(A["status_fd"])
WORK = A["workdir"]
WANT = set(A["layers"].split(",")) - {""}
code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
_n = os.open(os.devnull, os.O_RDONLY); os.dup2(_n, 0); os.close(_n)

def report(*words):
    os.write(STATUS, (" ".join(str(w) for w in words).replace("\n", " ") + "\n").encode("utf-8", "replace"))

def setup_failed(what):
    import traceback
    os.write(2, ("phi4-sandbox: setup failed: %s\n%s" % (what, traceback.format_exc())).encode("utf-8", "replace"))
    os._exit(SETUP_EXIT)

ROOT = os.geteuid() == 0
PRIVILEGED = WANT & {"netns", "pidns", "mountns", "ipcns", "utsns", "uid"}
libc = None
if (ROOT and PRIVILEGED) or "rlimits" in WANT:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: die with the host
    if os.getppid() != int(A["host"]):
        os._exit(SETUP_EXIT)  # the host died before that took effect
    def errname():
        import errno
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))
    def mount(src, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
            raise OSError("mount %s on %s: %s" % (src, target, errname()))
if PRIVILEGED and not ROOT:
    report("note", "namespaces and uid switch need root; running without them")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
FLAG_OF = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

def others_can_reach(path):
    """The first component of path that other users cannot pass (o+x; o+rx for path), or None."""
    parts = path.rstrip("/").split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i]) or "/"
        need = 0o005 if i == len(parts) else 0o001
        try:
            if os.stat(p).st_mode & need != need:
                return p
        except OSError:
            return p
    return None

def setup_mounts():
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Directories the interpreter imports from, hidden from an unprivileged uid (e.g. /root/.pyenv).
    covers = {}
    for d in sys.path:
        if os.path.isdir(d):
            blocker = others_can_reach(d)
            if blocker is not None and blocker != d:
                covers.setdefault(blocker, []).append(d)
    for blocker, dirs in covers.items():
        fds = [(d, os.open(d, os.O_PATH | os.O_DIRECTORY)) for d in dirs]
        mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for d, fd in fds:
            os.makedirs(d, 0o755, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, d, None, MS_BIND | MS_REC)
            os.close(fd)
        report("info", "exposed read-only under a tmpfs on %s: %s" % (blocker, " ".join(dirs)))
    mount(WORK, WORK, None, MS_BIND)
    with open("/proc/self/mountinfo") as f:
        infos = [line.split() for line in f]
    failed = []
    for info in infos:
        target = info[4].encode().decode("unicode_escape")
        if target == WORK:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for opt in info[5].split(","):
            flags |= FLAG_OF.get(opt, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            failed.append(target)
    if failed:
        report("note", "could not make read-only: " + " ".join(failed))

CLONE = {"netns": 0x40000000, "pidns": 0x20000000, "mountns": 0x00020000, "ipcns": 0x08000000, "utsns": 0x04000000}
active = []
if ROOT and libc is not None:
    for name, flag in CLONE.items():
        if name in WANT:
            if libc.unshare(flag) == 0:
                active.append(name)
            else:
                report("note", "%s unavailable: unshare failed (%s)" % (name, errname()))
    if "mountns" in active:
        try:
            setup_mounts()
        except OSError as exc:
            report("note", "mount namespace only partly set up: %s" % exc)
for name in active:
    report("layer", name)

# Fork: this process stays behind as a root-owned supervisor (outside the PID namespace) that
# reports the program's wait status; the child is the program (pid 1 of the new namespace).
try:
    pid = os.fork()
except OSError:
    setup_failed("fork")
if pid:
    try:
        _, status, ru = os.wait4(pid, 0)
    except BaseException:
        setup_failed("wait")
    report("exit", status, "%.6f" % (ru.ru_utime + ru.ru_stime), ru.ru_maxrss)
    os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

try:
    if "pidns" in active and "mountns" in active:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as exc:
            report("note", "no private /proc: %s" % exc)
    uid = None
    if "uid" in WANT and ROOT:
        # After the mounts above, the interpreter's directories must be readable by the new uid.
        blocked = [d for d in sys.path if os.path.isdir(d) and others_can_reach(d) is not None]
        if blocked:
            report("note", "uid switch skipped: %s is not readable by other users (and no mount namespace exposes it)" % blocked[0])
        else:
            for candidate in (int(A["uid"]), 65534):
                try:
                    os.chown(WORK, candidate, candidate)
                    os.setgroups([])
                    os.setgid(candidate)
                    os.setuid(candidate)
                    uid = candidate
                    break
                except OSError as exc:
                    report("note", "cannot switch to uid %d: %s" % (candidate, exc))
        if uid is not None:
            report("layer", "uid")
            report("uid", uid)
            if uid == 65534:
                report("note", "fell back to the shared uid 65534: RLIMIT_NPROC is shared with its other processes")
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL (after setuid, which clears it)
    if "rlimits" in WANT:
        import resource
        libc.mallopt(-8, 1)  # M_ARENA_MAX: threads must not reserve 64 MiB arenas under RLIMIT_AS
        cpu = int(A["cpu_s"])
        limits = [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_FSIZE, int(A["file_bytes"]), int(A["file_bytes"])),
            (resource.RLIMIT_NOFILE, 256, 256),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_AS, int(A["memory_bytes"]), int(A["memory_bytes"])),
        ]
        if uid is not None:
            limits.append((resource.RLIMIT_NPROC, int(A["nproc"]), int(A["nproc"])))
        else:
            report("note", "RLIMIT_NPROC not set: it counts every process of the uid, not this run's")
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        report("layer", "rlimits")
    os.chdir(WORK)
    os.umask(0o022)
    if "audit" in WANT:
        report("layer", "audit")
    report("ready")  # the program starts now; it cannot write to this pipe
    os.close(STATUS)
except BaseException:
    setup_failed("child")

if "audit" in WANT:
    def _install(work, allow_proc, marker, code_forbidden, stdlib):
        import re
        _write, _exit, _realpath, _fspath, _getpid = os.write, os._exit, os.path.realpath, os.fspath, os.getpid
        _isinstance, _str, _bytes, _int, _flush = isinstance, str, bytes, int, sys.stdout.flush
        _wmask = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        inside_prefix = work.rstrip("/") + "/"
        harmless = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
        secret = re.compile(
            r"^/proc/[^/]+/(task/[^/]+/)?(environ|mem)$|/\.(ssh|aws|gnupg|docker|kube|azure|config/gcloud)(/|$)"
            r"|/\.(netrc|git-credentials|pypirc|npmrc|env)$|^/etc/(g?shadow|sudoers)|^/(var/)?run/secrets(/|$)"
        )
        stdlib = tuple(p.rstrip("/") + "/" for p in stdlib)
        process_events = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                          "subprocess.Popen", "pty.spawn", "os.startfile"}
        path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                       "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                       "os.mkfifo": (0,), "os.mknod": (0,), "os.chflags": (0,), "os.setxattr": (0,),
                       "os.removexattr": (0,), "os.chdir": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,),
                       "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.rmtree": (0,),
                       "shutil.chown": (0,)}

        def deny(event, detail):
            try:
                _flush()
            except BaseException:
                pass
            try:
                _write(2, ("\n%s %s %r\n" % (marker, event, detail)).encode("utf-8", "replace"))
            finally:
                _exit(code_forbidden)

        def resolve(path):
            if _isinstance(path, _int):
                return None  # an open file descriptor
            path = _fspath(path)
            if _isinstance(path, _bytes):
                path = path.decode("utf-8", "surrogateescape")
            return path if path in harmless else _realpath(path)

        def inside(path):
            resolved = resolve(path)
            return resolved is None or resolved in harmless or resolved == inside_prefix[:-1] or resolved.startswith(inside_prefix)

        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                writing = (_isinstance(mode, _str) and any(c in mode for c in "wax+")) or (
                    _isinstance(flags, _int) and flags & _wmask)
                if writing:
                    if not inside(path):
                        deny(event, path)
                elif not _isinstance(path, _int):
                    resolved = resolve(path)
                    if not resolved.startswith(stdlib) and secret.search(resolved):
                        deny(event, path)
            elif event in path_events:
                for i in path_events[event]:
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        deny(event, args[i])
            elif event == "socket.__new__" and len(args) > 1 and args[1] == 1:
                pass  # AF_UNIX: socketpair() for asyncio's self-pipe; connect/bind stay forbidden
            elif event.startswith(("socket.", "ctypes.")) or event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
                deny(event, args[:1])
            elif event in process_events or event in ("os.kill", "os.killpg", "signal.pthread_kill"):
                if not allow_proc and not (event == "os.kill" and args[0] == _getpid()):
                    deny(event, args[:1])

        sys.addaudithook(hook)

    _install(WORK, A["allow_subprocess"] == "1", FORBIDDEN_MARKER, FORBIDDEN_EXIT, [d for d in sys.path if d])
    del _install
for _name in ("ctypes", "_ctypes", "ctypes._endian"):
    sys.modules.pop(_name, None)
    globals().pop(_name, None)

import linecache, types, builtins
_main = types.ModuleType("__main__")
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
sys.argv = ["main.py"]
linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")
del A, libc
exec(compile(code, "main.py", "exec"), _main.__dict__)
