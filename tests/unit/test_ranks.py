"""phi4_engine.ranks: work dealt over ranks and rank 0's decisions, in one process and in two
real gloo processes; AppendLog's reader mode for the ranks that do not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from phi4_engine import ranks
from phi4_engine.rundir import AppendLog
from tests.conftest import REPO

_WORKER = """
import json, os, sys
import torch.distributed as dist
from phi4_engine import ranks

rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2")
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
seen = []
squares = ranks.split_work(list(range(5)), lambda share: [seen.append(u) or u * u for u in share])
empty = ranks.split_work([], lambda share: 1 / 0)
decision = ranks.from_main({"done": rank == 0, "rank": rank})
print(json.dumps({"rank": rank, "seen": seen, "squares": squares, "empty": empty, "decision": decision}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_split_work_and_from_main_in_one_process():
    assert ranks.split_work([1, 2, 3], lambda share: [u + 1 for u in share]) == [2, 3, 4]
    assert ranks.split_work([], lambda share: 1 / 0) == []
    assert ranks.from_main({"x": 1}) == {"x": 1}


def test_two_ranks_split_the_work_and_agree_on_rank_0s_decision(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "init")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["seen"] for r in results] == [[0, 2, 4], [1, 3]]  # dealt round-robin
    assert all(r["squares"] == [0, 1, 4, 9, 16] and r["empty"] == [] for r in results)
    assert all(r["decision"] == {"done": True, "rank": 0} for r in results)


def test_append_log_reader_ignores_a_torn_line_and_writes_nothing(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2')  # torn by a crash
    reader = AppendLog(path, write=False)
    reader.append({"a": 3})
    reader.close()
    assert reader.records == [{"a": 1}] and path.read_bytes() == b'{"a": 1}\n{"a": 2'
    with AppendLog(path) as writer:  # the writer cuts the torn line, then appends
        writer.append({"a": 3})
    assert path.read_bytes() == b'{"a": 1}\n{"a":3}\n'  # orjson writes compact JSON
    assert not AppendLog(tmp_path / "none" / "log.jsonl", write=False).records
    assert not (tmp_path / "none").exists()
