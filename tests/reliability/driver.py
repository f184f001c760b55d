"""``python -m tests.reliability.driver <phi4-engine CLI args>``: the real CLI in its own
process, with the test plugins registered and, if ``PHI4_TEST_FAULT`` says so, one fault
injected. Tests start it through a fork server (``conftest.run_driver``) so that each run costs a
fork, not eight seconds of importing torch and torchtitan.

Faults (``KIND:STEP``, STEP an optimizer step of the stage named by ``PHI4_TEST_FAULT_STAGE``
when set, else of any stage):

* ``kill-mid-save``      SIGKILL after the shard files of checkpoint step-STEP are written,
                         before DCP's ``.metadata`` (a save torn half-way);
* ``kill-before-commit`` SIGKILL after ``.metadata``, before the engine's manifest;
* ``nan-loss``           the loss and one gradient become NaN at STEP;
* ``inf-grad``           one gradient element becomes inf at STEP (the loss stays finite);
* ``enospc``             writing checkpoint step-STEP fails with ENOSPC (disk full);
* ``hook-raise``         a plugin raises in ``phi4_step_end`` at STEP (a broken dashboard plugin).

Only this file reaches into the engine's internals; the tests read files and exit codes.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import torch

import tests.plugins


def _install_plugins() -> None:
    import phi4_engine.manager as manager

    init = manager.PluginHost.__init__

    def with_test_plugin(self, extra_plugins=()):
        init(self, (*extra_plugins, tests.plugins))

    manager.PluginHost.__init__ = with_test_plugin


def _stage_matches(path: str) -> bool:
    stage = os.environ.get("PHI4_TEST_FAULT_STAGE")
    return stage is None or f"/{stage}/checkpoints/" in str(path) + "/"


def _install_fault(kind: str, step: int) -> None:
    import torch.distributed.checkpoint.filesystem as fs

    from phi4_engine import checkpoints
    from phi4_engine.titan import trainer

    def is_target(path) -> bool:
        return str(path).rstrip("/").endswith(f"/step-{step}") and _stage_matches(str(path).rstrip("/") + "/")

    if kind == "kill-mid-save":
        finish = fs._FileSystemWriter.finish

        def finish_or_die(self, metadata, results):
            if is_target(self.path):
                os.kill(os.getpid(), signal.SIGKILL)
            return finish(self, metadata, results)

        fs._FileSystemWriter.finish = finish_or_die
    elif kind == "kill-before-commit":
        write_manifest = checkpoints.write_manifest

        def write_or_die(path, at_step, entries):
            if is_target(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return write_manifest(path, at_step, entries)

        checkpoints.write_manifest = write_or_die
    elif kind == "enospc":
        write_data = fs._FileSystemWriter.write_data

        def write_or_fail(self, plan, planner):
            if is_target(self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return write_data(self, plan, planner)

        fs._FileSystemWriter.write_data = write_or_fail
    elif kind in ("nan-loss", "inf-grad"):
        stop = trainer.Phi4Trainer._stop_if_nonfinite

        def poisoned(self):
            if self.step == step and _stage_matches(self.checkpointer.folder + "/"):
                param = next(p for m in self.model_parts for p in m.parameters() if p.grad is not None)
                grad = trainer._local(param.grad)
                if kind == "nan-loss":
                    self._step_losses = [loss * float("nan") for loss in self._step_losses]
                    grad.fill_(float("nan"))
                else:
                    grad.view(-1)[0] = float("inf")
            return stop(self)

        trainer.Phi4Trainer._stop_if_nonfinite = poisoned
    elif kind == "hook-raise":
        import phi4_engine.manager as manager
        from phi4_engine import hookimpl

        class Dashboard:
            __name__ = "faulty-dashboard"

            @hookimpl
            def phi4_step_end(self, stage, stage_dir, step):
                if step == at_step and _stage_matches(stage_dir + "/checkpoints/"):
                    raise ConnectionError("dashboard unreachable")

        at_step = step
        init = manager.PluginHost.__init__

        def with_dashboard(self, extra_plugins=()):
            init(self, (*extra_plugins, Dashboard()))

        manager.PluginHost.__init__ = with_dashboard
    else:
        raise SystemExit(f"driver: unknown fault {kind!r}")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    _install_plugins()
    fault = os.environ.get("PHI4_TEST_FAULT")
    if fault:
        kind, step = fault.split(":")
        _install_fault(kind, int(step))
    from phi4_engine.cli import main as cli_main

    return cli_main(argv)


def forked_main(argv: list[str], env: dict[str, str], stdout: str, stderr: str, *, plugins: bool = True,
                cwd: str | None = None) -> None:  # fmt: skip
    """Entry point of a process forked from the test's fork server (modules already imported,
    no torch thread started): the CLI with this process's own environment, working directory
    and output files; with the test plugins and faults (``main``) or as a user runs it."""
    import traceback

    from phi4_engine import cli

    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    try:
        if plugins:
            code = main(argv)
        else:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
            code = cli.main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def nonfinite_rank(rank: int, init_file: str, folder: str, result: str) -> None:
    """One of two gloo ranks running the trainer's non-finite guard on a small model where only
    rank 1's gradient is inf; writes what it raised to ``result``."""
    import hashlib
    import types

    import torch.distributed as dist

    from phi4_engine.errors import NonFiniteError
    from phi4_engine.titan.trainer import Phi4Trainer

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    model = torch.nn.Linear(4, 2)
    model(torch.ones(1, 4)).sum().backward()
    if rank == 1:
        model.weight.grad[0, 0] = float("inf")
    trainer = types.SimpleNamespace(
        model_parts=[model], _step_losses=[torch.tensor(0.5)], device=torch.device("cpu"), step=5,
        _batch_digest=hashlib.sha256(f"rank{rank}".encode()), checkpointer=types.SimpleNamespace(folder=folder),
        config=types.SimpleNamespace(dump_folder=folder),
    )  # fmt: skip
    trainer._report_nonfinite = types.MethodType(Phi4Trainer._report_nonfinite, trainer)
    try:
        Phi4Trainer._stop_if_nonfinite(trainer)
        outcome = "stepped"
    except NonFiniteError as exc:
        outcome = f"stopped: {exc}"
    with open(result, "w") as f:
        f.write(outcome)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
