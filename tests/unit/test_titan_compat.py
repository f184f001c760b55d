"""Every shim in ``phi4_engine.titan.compat`` is tested twice (FACTS.md §5):

* **needed**: the upstream problem still exists on this torch/host. When one of these fails,
  torch or torchtitan fixed it: delete the shim and its tests.
* **working**: with the shim, the torchtitan code path that used to fail now runs.

Checks that need a pristine interpreter (no shim installed yet) run in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import phi4_engine.titan  # noqa: F401  (installs the shims before torchtitan is imported)
from phi4_engine.titan import compat

HAS_CUDA = torch.cuda.is_available()
ON_CUDA_REASON = "CUDA is available: torchtitan picks cuda itself and the CPU shim is not installed"
TORCH_BEFORE_2_14 = torch.__version__ < "2.14"


def _fresh_python(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a new interpreter (no shims installed) and return its stripped stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


# --------------------------------------------------------------------------------------------
# 1. CPU device shim (FACTS.md §5 items 2 and 3)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason=ON_CUDA_REASON)
def test_cpu_device_shim_is_needed():
    out = _fresh_python(
        """
        import torch
        import torchtitan.tools.utils as u
        print(u.device_type, u.device_module is torch.cuda)
        """
    )
    assert out.splitlines()[-1] == "cuda True", (
        "torchtitan no longer falls back to 'cuda' on a CPU-only host (tools/utils.py "
        f"get_device_info() gave {out!r}): the CPU device shim in compat.py may be unnecessary; "
        "delete it and this test if a plain torchtitan run works on CPU"
    )


@pytest.mark.skipif(HAS_CUDA, reason=ON_CUDA_REASON)
def test_cpu_device_shim_works():
    import torchtitan.components.metrics as titan_metrics
    import torchtitan.distributed.utils as titan_dist_utils
    import torchtitan.tools.utils as titan_utils

    assert compat.needs_cpu_device_shim()
    assert titan_utils.device_type == "cpu"
    for module in (titan_utils, titan_metrics, titan_dist_utils):
        assert module.device_type == "cpu", module.__name__
        assert module.device_module is titan_utils.device_module, module.__name__
    # dist.barrier(device_ids=[current_device()]) (distributed/utils.py:586) needs an int.
    current = titan_metrics.device_module.current_device()
    assert current == 0 and type(current) is int

    monitor = titan_metrics.build_device_memory_monitor()
    assert monitor.device_capacity > 0
    stats = monitor.get_peak_stats()
    assert stats.num_ooms == -1  # "unknown": the CPU has no allocator statistics
    monitor.reset_peak_stats()


@pytest.mark.skipif(HAS_CUDA, reason=ON_CUDA_REASON)
def test_cpu_device_shim_fixes_modules_imported_before_it():
    out = _fresh_python(
        """
        import torchtitan.components.metrics as m   # imported before the shim: holds torch.cuda
        import phi4_engine.titan
        print(m.device_type, repr(m.device_module.current_device()))
        """
    )
    assert out.splitlines()[-1] == "cpu 0"


# --------------------------------------------------------------------------------------------
# 2. torch.distributed.set_timeout alias (FACTS.md §5 item 4)
# --------------------------------------------------------------------------------------------


def test_set_timeout_alias_is_needed():
    has_it = _fresh_python(
        "import torch.distributed as d; print(hasattr(d, 'set_timeout'))"
    ).splitlines()[-1]
    if TORCH_BEFORE_2_14:
        assert has_it == "False", (
            f"torch {torch.__version__} has torch.distributed.set_timeout: drop the alias "
            "(compat._set_timeout / needs_set_timeout_alias) and this test"
        )
        assert compat.needs_set_timeout_alias()
    else:
        assert has_it == "True", f"torch {torch.__version__} >= 2.14 lacks set_timeout?"
        assert not compat.needs_set_timeout_alias()


def _gloo_timeout(group=None) -> timedelta:
    group = group if group is not None else dist.group.WORLD
    return group._get_backend(torch.device("cpu")).options._timeout


@pytest.fixture
def single_process_gloo(tmp_path: Path):
    assert not dist.is_initialized(), "a previous test leaked a process group"
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg_init'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_set_timeout_alias_works(single_process_gloo):
    assert _gloo_timeout() != timedelta(seconds=60)
    dist.set_timeout(timedelta(seconds=60))
    assert _gloo_timeout() == timedelta(seconds=60)


@pytest.mark.skipif(HAS_CUDA, reason=ON_CUDA_REASON)
def test_torchtitan_set_pg_timeouts_runs_on_cpu(single_process_gloo):
    """The call after step 1: barrier(device_ids=[current_device()]), synchronize, set_timeout."""
    # torchtitan builds size-1 mesh dims on the "fake" backend; importing torchtitan.trainer
    # registers it as a side effect, this import does it directly.
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_pg_timeouts

    dims = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=1,
        tp=1,
        pp=1,
        ep=1,
        world_size=1,
        spmd_backend="partial_dtensor",
    )
    set_pg_timeouts(timedelta(seconds=45), dims)
    assert _gloo_timeout() == timedelta(seconds=45)


# --------------------------------------------------------------------------------------------
# 3. force_sum_reduction: gloo rejects PREMUL_SUM (FACTS.md §5 item 6)
# --------------------------------------------------------------------------------------------

_FSDP_WORKER = """
import json, sys
import torch, torch.distributed as dist

rank, init_file, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)

from phi4_engine.titan import compat
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division

torch.manual_seed(0)
model = torch.nn.Linear(4, 4, bias=False)
out = {"rank": rank, "weight": model.weight.detach().tolist()}
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
disable_fsdp_gradient_division(model)  # what torchtitan does: set_gradient_divide_factor(1.0)
if mode == "force":
    compat.force_sum_reduction(model)
x = torch.arange(8.0).reshape(2, 4) + 10 * rank
try:
    model(x).pow(2).sum().backward()
    out["grad"] = model.weight.grad.full_tensor().tolist()
except RuntimeError as exc:
    out["error"] = str(exc)
print(json.dumps(out), flush=True)
if "error" in out:
    # After a failed collective the ranks' gloo sequences no longer match: a barrier here can
    # see the peer's teardown as "Connection closed by peer". Both ranks fail locally (the
    # reduce op is rejected before any byte is sent), so each just leaves.
    import os
    os._exit(0)
dist.barrier()  # neither rank tears gloo down while the other is still in a collective
dist.destroy_process_group()
"""


def _run_fsdp_pair(tmp_path: Path, mode: str) -> list[dict]:
    script = tmp_path / "fsdp_worker.py"
    script.write_text(_FSDP_WORKER)
    init_file = tmp_path / f"init_{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(init_file), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"worker failed:\n{stdout}\n{stderr}"
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def test_premul_sum_on_gloo_is_rejected(tmp_path):
    results = _run_fsdp_pair(tmp_path, "plain")
    for result in results:
        assert "PREMUL_SUM" in result.get("error", ""), (
            "FSDP2 with torchtitan's gradient divide factor 1.0 no longer fails on gloo "
            f"(rank {result['rank']}: {result}); compat.force_sum_reduction may be unnecessary"
        )


def test_force_sum_reduction_sums_gradients_over_ranks(tmp_path):
    results = _run_fsdp_pair(tmp_path, "force")
    weight = torch.tensor(results[0]["weight"])
    expected = torch.zeros_like(weight)
    for rank in range(2):
        w = weight.clone().requires_grad_(True)
        x = torch.arange(8.0).reshape(2, 4) + 10 * rank
        (x @ w.T).pow(2).sum().backward()
        expected += w.grad
    for result in results:
        assert "error" not in result, result
        torch.testing.assert_close(torch.tensor(result["grad"]), expected)


# --------------------------------------------------------------------------------------------
# 4. FlexAttention has no CPU backward: why phi4.py defaults to SDPA (FACTS.md §5 item 7)
# --------------------------------------------------------------------------------------------


def test_flex_attention_has_no_cpu_backward():
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError as exc:
        assert "backward on CPU" in str(exc)
    else:
        pytest.fail(
            "torch's FlexAttention now supports backward on CPU: switch the CPU default in "
            "phi4.inner_attention_config to 'flex' (document masking) and drop this test"
        )


# --------------------------------------------------------------------------------------------
# 5. triton: torchtitan 0.3.0 imports it unconditionally (FACTS.md §5 item 1)
# --------------------------------------------------------------------------------------------


def test_triton_installed_and_torchtitan_trainer_imports():
    assert importlib.util.find_spec("triton") is not None, (
        "triton is missing: `import torchtitan.trainer` fails without it; install the pin "
        "from constraints.txt (pip install -c constraints.txt ...)"
    )
    import torchtitan.trainer  # noqa: F401


# 6. spmd_backend="partial_dtensor" (FACTS.md §5 item 5) is set by trainer.trainer_config; a
#    test of that belongs with trainer.py's tests.


def test_data_ignore_index_matches_torchtitan():
    """The data layer may not import torchtitan, so it restates the ignore label; keep them equal."""
    from torchtitan.components.loss import IGNORE_INDEX as TITAN_IGNORE

    from phi4_engine.data.mixture import IGNORE_INDEX

    assert IGNORE_INDEX == TITAN_IGNORE


# --------------------------------------------------------------------------------------------
# 5. torchao's CUDA kernels on a CPU build: one warning per .so at import, in every process
# --------------------------------------------------------------------------------------------


def _stderr_of(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason=ON_CUDA_REASON)
def test_torchao_warnings_are_silenced_and_still_need_to_be():
    plain = _stderr_of("import torchao")
    assert "Failed to load" in plain, "torchao no longer warns about its CUDA kernels on a CPU build: the shim can go"
    assert "is an Enum subclass" in plain, "torch no longer logs torchao's Enum registration: _DropTorchaoEnumNotice can go"
    ours = _stderr_of("import phi4_engine.titan.trainer, torchao.float8")
    assert "Failed to load" not in ours and "is an Enum subclass" not in ours
