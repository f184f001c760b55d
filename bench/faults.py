"""Fault campaign: real runs of every stage kind, faulted at random places, then recovered by
re-running the same command; each ends checked against an uninterrupted run of the same spec.

The spec is the reliability tests' six-stage one (debug model, a checkpoint every 2 steps, all
checkpoints kept so that a lost one would show). Each trial picks a trained folder (pretrain,
midtrain, sft, dpo-pivotal, dpo-judge, refusal/sft, refusal/dpo) and a step at random, injects
one fault through ``tests/reliability/driver.py`` and records:

* detected: the faulted run ended as promised (SIGKILL; or one line and its exit code: 2 plugin
  or identity change, 4 non-finite, 5 checkpoint damage or disk full);
* recovered: after re-running the same command (and, for a damaged checkpoint, once with
  ``checkpoint.on_corrupt: "previous"``), every stage's weights sha256, per-step metrics
  (loss, lr, grad norm, batch digest), TensorBoard steps and preference pairs equal the
  uninterrupted run's;
* data lost: committed things present right after the fault that the recovery lost or changed —
  committed checkpoints (a damaged one moved to quarantine is not lost), finished stages'
  weights, the complete lines of append-only logs (PTS cache, candidates, verdicts);
* time: wall seconds of the faulted run plus its recovery, against the uninterrupted run's.

    python bench/faults.py [--trials 3] [--faults sigkill,nan-loss,...] [--seed 0]

Last line: {"bench": "faults", "ours": s, "baseline": s, "unit": "s/run", "ratio": ..., "rows": [...]}:
ours = mean wall time of a faulted run plus its recovery; baseline = the uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import write_spec  # noqa: E402
from tests.reliability.conftest import (  # noqa: E402
    committed,
    ledger,
    metrics,
    run_driver,
    run_until_killed,
    six_stage_spec,
    tensorboard_steps,
)

FOLDERS = ["pretrain", "midtrain", "sft", "dpo-pivotal", "dpo-judge", "refusal/sft", "refusal/dpo"]
PAIRS = ["dpo-pivotal/data/pairs.jsonl", "dpo-judge/data/pairs.jsonl", "refusal/data/pairs.jsonl"]
LOGS = ["dpo-pivotal/data/pts-cache.jsonl", "dpo-judge/data/candidates.jsonl", "dpo-judge/data/verdicts.jsonl"]
# fault → (what it is, the faulted run's expected exit code)
FAULTS = {
    "sigkill": ("SIGKILL at a random moment", -9),
    "kill-mid-save": ("SIGKILL while writing a checkpoint (shards written, no .metadata)", -9),
    "kill-before-commit": ("SIGKILL after DCP's .metadata, before the manifest", -9),
    "flipped-byte": ("a flipped byte in the newest checkpoint", 5),
    "missing-file": ("a file of the newest checkpoint deleted", 5),
    "nan-loss": ("NaN loss and gradient", 4),
    "inf-grad": ("one inf gradient element", 4),
    "enospc": ("disk full (ENOSPC) while saving", 5),
    "hook-raise": ("a plugin raising in phi4_step_end", 2),
    "identity-change": ("resumed with a changed seed", 2),
}


def campaign_spec() -> dict:
    spec = six_stage_spec()
    spec["checkpoint"]["keep_latest_k"] = 0  # keep every checkpoint: a lost one would show
    return spec


def timed(args: list[str], **env: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = run_driver(*args, **env)
    return done.returncode, done.stderr, time.perf_counter() - start


def killed_when(args: list[str], trigger: Callable[[], bool]) -> tuple[int, float]:
    """Run until ``trigger()`` holds, then SIGKILL; (exit code, seconds)."""
    start = time.perf_counter()
    outcome = run_until_killed(args, trigger, rng=random.Random(0), max_delay=0.0)
    return (-9 if outcome == "killed" else 0), time.perf_counter() - start


def digest_tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def kept_state(run: Path) -> dict[str, str]:
    """What a recovery must not lose: committed checkpoints, finished stages' weights, the
    complete lines of append-only logs (a torn last line may be cut)."""
    state = {}
    for folder in FOLDERS:
        ckpts = run / folder / "checkpoints"
        for step_dir in sorted(ckpts.glob("step-*")) if ckpts.is_dir() else []:
            if (step_dir / "manifest.json").exists():
                state[f"{folder}/{step_dir.name}"] = digest_tree(step_dir)
    if (run / "ledger.json").exists():
        for name, entry in ledger(run)["stages"].items():
            if entry.get("status") == "done":
                state[f"weights of {name}"] = entry["weights_sha256"]
    for log in LOGS:
        if (run / log).exists():
            data = (run / log).read_bytes()
            state[log] = data[: data.rfind(b"\n") + 1].decode()
    return state


def lost(before: dict[str, str], run: Path, set_aside: set[str]) -> list[str]:
    after = kept_state(run)
    missing = []
    for key, value in before.items():
        if key in set_aside:
            continue
        now = after.get(key)
        same = now is not None and (now.startswith(value) if key in LOGS else now == value)
        if not same:
            missing.append(key)
    return missing


def differences(run: Path, straight: Path) -> list[str]:
    """How the recovered run differs from the uninterrupted one (empty: identical)."""
    found = []
    a, b = ledger(straight)["stages"], ledger(run)["stages"]
    for name, entry in a.items():
        if b.get(name, {}).get("weights_sha256") != entry["weights_sha256"]:
            found.append(f"{name}: weights")
    for folder in FOLDERS:
        rows = metrics(straight / folder)
        if metrics(run / folder) != rows:
            found.append(f"{folder}: metrics")
        if tensorboard_steps(run / folder) != [r["step"] for r in rows]:
            found.append(f"{folder}: TensorBoard steps")
    for pairs in PAIRS:
        if (run / pairs).read_bytes() != (straight / pairs).read_bytes():
            found.append(pairs)
    return found


def checkpoint_steps(n: int, interval: int) -> list[int]:
    return sorted({s for s in range(interval, n + 1, interval)} | {n})


def trial(fault: str, rng: random.Random, spec: Path, run: Path, straight: Path, base_s: float) -> dict:
    args = ["run", str(spec), "--run-dir", str(run)]
    expected = FAULTS[fault][1]
    folder = rng.choice(FOLDERS)
    n = len(metrics(straight / folder))
    seconds, set_aside, detected = 0.0, set(), True
    if fault == "sigkill":
        at = rng.uniform(0.05, 0.95) * base_s
        start = time.perf_counter()
        code, seconds = killed_when(args, lambda: time.perf_counter() - start > at)
        where = f"after {at:.1f}s"
    elif fault in ("flipped-byte", "missing-file", "identity-change"):
        steps = [s for s in checkpoint_steps(n, 2) if s < n] or [n]
        step = rng.choice(steps)
        code, seconds = killed_when(args, committed(run / folder, step))
        where = f"{folder} after step-{step}"
        if fault == "identity-change":
            code, stderr, s = timed(args + ["--set", "seed=1"])
            seconds += s
            detected = code == 2 and "seed" in stderr.strip().splitlines()[-1]
        else:
            ckpts = sorted((run / folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
            newest = [p for p in ckpts if (p / "manifest.json").exists()][-1]
            victim = rng.choice(sorted(p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"))
            if fault == "flipped-byte":
                data = bytearray(victim.read_bytes())
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                victim.write_bytes(bytes(data))
            else:
                victim.unlink()
            set_aside.add(f"{folder}/{newest.name}")
            where = f"{folder} {newest.name}/{victim.name}"
            code, stderr, s = timed(args)
            seconds += s
            detected = code == 5 and str(victim) in stderr.strip().splitlines()[-1]
    else:
        step = rng.choice(checkpoint_steps(n, 2) if fault in ("kill-mid-save", "kill-before-commit", "enospc") else range(1, n + 1))
        code, _, seconds = timed(args, PHI4_TEST_FAULT=f"{fault}:{step}", PHI4_TEST_FAULT_STAGE=folder)
        where = f"{folder} step {step}"
    detected = detected and code == expected
    before = kept_state(run)
    recovery = [args + ["--set", 'checkpoint.on_corrupt="previous"']] if fault in ("flipped-byte", "missing-file") else []
    recovery += [args, args]  # the same command again (twice at most)
    for command in recovery:
        code, stderr, s = timed(command)
        seconds += s
        if code == 0:
            break
    differ = differences(run, straight) if code == 0 else ["did not finish"]
    return {"fault": fault, "where": where, "detected": detected, "recovered": not differ, "differ": differ,
            "lost": lost(before, run, set_aside), "seconds": seconds,
            "error": None if code == 0 else stderr.strip().splitlines()[-1:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="random trials per fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faults = args.faults.split(",")
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault {unknown[0]!r}; choose from {', '.join(FAULTS)}")
    os.environ.setdefault("PHI4_ENGINE_PROGRESS", "0")
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "out of order step": a resume's purge, read back
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="phi4-faults-") as tmp:
        spec = write_spec(Path(tmp) / "spec.json", campaign_spec())
        straight = Path(tmp) / "straight"
        timed(["plugins"])  # starts the fork server (its imports are no run's cost)
        code, stderr, base_s = timed(["run", str(spec), "--run-dir", str(straight)])
        assert code == 0, stderr
        print(f"uninterrupted run: {base_s:.1f}s", flush=True)
        results = []
        for fault in faults:
            for i in range(args.trials):
                result = trial(fault, rng, spec, Path(tmp) / f"{fault}-{i}", straight, base_s)
                results.append(result)
                flags = f"detected={result['detected']} recovered={result['recovered'] or result['differ']} lost={result['lost']}"
                print(f"  {fault:<20} {result['where']:<40} {flags} {result['seconds']:.1f}s"
                      + (f" {result['error']}" if result["error"] else ""), flush=True)  # fmt: skip
    rows = []
    print("\n| fault injected | runs tried | detected as promised | runs recovered | data lost | time vs uninterrupted |")
    print("|---|---|---|---|---|---|")
    for fault in faults:
        mine = [r for r in results if r["fault"] == fault]
        row = {"fault": fault, "tried": len(mine), "detected": sum(r["detected"] for r in mine),
               "recovered": sum(r["recovered"] for r in mine), "lost": sum(len(r["lost"]) for r in mine),
               "time_ratio": round(statistics.mean(r["seconds"] for r in mine) / base_s, 2)}  # fmt: skip
        rows.append(row)
        print(f"| {FAULTS[fault][0]} | {row['tried']} | {row['detected']} | {row['recovered']} | {row['lost']} | {row['time_ratio']}× |")
    ours = statistics.mean(r["seconds"] for r in results)
    print(json.dumps({"bench": "faults", "ours": round(ours, 2), "baseline": round(base_s, 2), "unit": "s/run",
                      "ratio": round(ours / base_s, 3), "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
