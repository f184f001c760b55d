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
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

# Rank 0 may evaluate or convert weights alone while the others wait at a barrier.
BARRIER_TIMEOUT = timedelta(hours=2)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

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


# -- work split over ranks ---------------------------------------------------------------------
# Generation (PTS rollouts, judged candidates, refusal answers, evaluations) runs on every rank
# in lock step: each rank does its share of the work units and all ranks receive every result.
# Units are chosen so their results do not depend on which rank computes them (each generation
# batch has its own seed, each rollout its own key): a run gives the same data under any --nproc.


def _group_ready() -> bool:
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def split_work(units: Sequence[T], work: Callable[[list[T]], Sequence[R]]) -> list[R]:
    """``work(units)`` with the units dealt round-robin over the ranks: rank ``r`` computes
    ``work(units[r::world])`` and every rank returns all results, in unit order. ``work`` must
    return one result per unit. Every rank must call this with the same units."""
    if not _group_ready():
        return list(work(list(units))) if units else []
    import torch.distributed as dist

    world, me = world_size(), rank()
    share = list(units[me::world])
    mine = list(work(share)) if share else []
    if len(mine) != len(share):
        raise ValueError(f"split_work: {len(mine)} results for {len(share)} units")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    out: list[Any] = [None] * len(units)
    for r, results in enumerate(gathered):
        out[r::world] = results
    return out


def from_main(value: V) -> V:
    """Rank 0's ``value`` on every rank: decisions taken from files rank 0 writes (is this phase
    done? is this result cached?) must be the same everywhere, or the ranks' collectives part."""
    if not _group_ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
