"""Compatibility shims that let torchtitan 0.3.0 run on torch 2.13 and on CPU.

torchtitan 0.3.0 targets torch >= 2.14 and CUDA. Each shim below names the exact failure it
prevents (see FACTS.md §5) and is covered by ``tests/unit/test_titan_compat.py``, which fails
both when a shim stops working and when the upstream problem it papers over disappears (so the
shim can be deleted). ``install()`` must run before any other torchtitan module is imported;
``phi4_engine.titan.__init__`` does that.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch
import torch.distributed as dist

_installed = False


class _CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the CUDA-style calls torchtitan makes unconditionally.

    Why: torchtitan picks its device module once at import (``tools/utils.py:55``) and falls
    back to ``torch.cuda`` when no accelerator exists, then calls ``set_device``,
    ``get_device_properties``, ``memory_stats``... (``components/metrics.py:42-92``). On CPU
    these are meaningless, so they become no-ops with honest values. ``current_device()``
    returns the int 0 because ``dist.barrier(device_ids=[...])`` rejects the string "cpu"
    (``distributed/utils.py:586``).
    """

    def __init__(self) -> None:
        super().__init__("phi4_engine_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> Any:
        import os

        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return types.SimpleNamespace(total_memory=pages, name="cpu")

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None


def needs_cpu_device_shim() -> bool:
    return not torch.cuda.is_available()


def needs_set_timeout_alias() -> bool:
    # torch.distributed.set_timeout arrived in torch 2.14; torchtitan calls it after step 1
    # (distributed/utils.py:595). Our own alias counts as "missing", so the answer does not
    # flip to False once install() has run.
    return getattr(dist, "set_timeout", _set_timeout) is _set_timeout


def _set_timeout(timeout: Any, group: Any = None) -> None:
    from torch.distributed import distributed_c10d

    distributed_c10d._set_pg_timeout(timeout, group)


def needs_quiet_torchao() -> bool:
    """torchao wheels carry CUDA kernels (``_C_cutlass_90a``, ``_C_mxfp8``) that cannot load
    under a CPU build of torch; torchao then logs one warning per file at import, in every
    process of every run. The float8 path torchtitan uses is pure Python and works without them."""
    return not torch.cuda.is_available()


class _DropTorchaoEnumNotice(logging.Filter):
    """torchao 0.18 registers its Enums as pytree constants, which torch >= 2.13 logs as
    deprecated (``torch/utils/_pytree.py`` ``register_constant``) once per Enum, at import, in
    every process. Only that notice is dropped; other pytree warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


def install() -> None:
    """Apply every shim this torch/host needs. Idempotent."""
    global _installed
    if _installed:
        return
    if needs_quiet_torchao():
        logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(_DropTorchaoEnumNotice())
    if needs_set_timeout_alias():
        dist.set_timeout = _set_timeout  # type: ignore[attr-defined]
    if needs_cpu_device_shim():
        import torch._utils as torch_utils

        # torchtitan computes (device_type, device_module) at import of tools.utils and every
        # other module copies those names with `from ... import`, so the lookup is redirected
        # only while tools.utils is first imported, and its module object replaced right after.
        original = torch_utils._get_available_device_type
        torch_utils._get_available_device_type = lambda: "cpu"
        try:
            import torchtitan.tools.utils as titan_utils
        finally:
            torch_utils._get_available_device_type = original
        old_type, old_module = titan_utils.device_type, titan_utils.device_module
        cpu_module = _CpuDeviceModule()
        titan_utils.device_type = "cpu"
        titan_utils.device_module = cpu_module
        # If torchtitan modules were imported before install() (against the rule above), they
        # hold their own copies of the CUDA fallback; rebind those too.
        for name, module in list(sys.modules.items()):
            if not name.startswith("torchtitan.") or module is None:
                continue
            if getattr(module, "device_module", None) is old_module:
                module.device_module = cpu_module
            if old_type != "cpu" and getattr(module, "device_type", None) == old_type:
                module.device_type = "cpu"
    _installed = True


def force_sum_reduction(model: torch.nn.Module) -> None:
    """Make FSDP reduce gradients with SUM instead of PREMUL_SUM.

    Why: torchtitan sets a gradient divide factor of 1.0 (``distributed/fsdp.py:41``), which
    FSDP2 turns into ``ReduceOp.PREMUL_SUM``; gloo rejects it (``RuntimeError: Cannot use
    ReduceOp.PREMUL_SUM with Gloo``). SUM gives the same result since the factor is 1.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
