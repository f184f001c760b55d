"""Which process this is when torchrun launched several (a plain process is rank 0 of 1).
Torch is imported only when there are several (validating a spec stays light).

Under torchrun every rank runs the same Engine: all of them train (collectives), only rank 0
writes the run directory (spec, ledger, logs, evaluations) and calls lifecycle hooks; the
others wait at :func:`barrier` where rank 0 works alone.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator

# Rank 0 may evaluate or convert weights alone while the others wait at a barrier.
BARRIER_TIMEOUT = timedelta(hours=2)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


@contextlib.contextmanager
def launched_group() -> Iterator[None]:
    """The process group of a torchrun launch, for the whole run (torchtitan finds it and
    does not make its own); nothing in a plain process."""
    if world_size() == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
