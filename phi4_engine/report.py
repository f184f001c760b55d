"""``phi4-engine report RUN_DIR``: one picture of a run, from its own files.

Top row: the training loss of every stage, one after another on a shared step axis (each
stage's ``metrics.jsonl``; a stage with phases, like refusal, contributes each phase in order).
Bottom row: every evaluation's headline metrics before → after each stage (``eval.json``).
Nothing is recomputed; the picture is a view of what the run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from phi4_engine.errors import EngineError

HEADLINES = ("accuracy", "mean", "bogus_not_attempted", "answerable_correct")
"""Metrics shown per evaluation (a held-out loss evaluation shows its longest length)."""


def _metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def stage_curves(run_dir: Path, stage: str, phases: list[str] | None = None) -> list[tuple[str, list[int], list[float]]]:
    """``(label, steps, losses)`` of a stage, or of each of its phases (sub-folders with metrics,
    in the order the ledger lists them, else by name)."""
    folder = run_dir / stage
    parts = [(stage, folder)] if (folder / "metrics.jsonl").exists() else []
    found = {p.name: p for p in folder.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()}
    order = [p for p in (phases or []) if p in found] + sorted(set(found) - set(phases or []))
    parts += [(f"{stage}/{name}", found[name]) for name in order]
    curves = []
    for label, path in parts:
        rows = [r for r in _metrics(path) if "loss" in r]
        curves.append((label, [r["step"] for r in rows], [r["loss"] for r in rows]))
    return curves


def headline(name: str, metrics: dict[str, float]) -> list[str]:
    keys = [k for k in HEADLINES if k in metrics] or [k for k in metrics if k.startswith("loss@")][-1:]
    return [f"{name}.{k}" for k in keys]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<run>/report.png`` (or ``out``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    spec_path = run_dir / "spec.json"
    if not spec_path.exists():
        raise EngineError(f"{run_dir}: not a run directory (no spec.json)")
    stages = [s.get("name") or s["kind"] for s in orjson.loads(spec_path.read_bytes())["stages"]]
    stages = [s for s in stages if (run_dir / s).is_dir()]
    if not stages:
        raise EngineError(f"{run_dir}: no stage has run yet")

    ledger_path = run_dir / "ledger.json"
    ledger = orjson.loads(ledger_path.read_bytes()).get("stages", {}) if ledger_path.exists() else {}
    panels: list[tuple[str, str, float | None, float]] = []  # (stage, metric, before, after)
    for stage in stages:
        path = run_dir / stage / "eval.json"
        if path.exists():
            evals = orjson.loads(path.read_bytes())
            for name, metrics in evals.get("after", {}).items():
                for key in headline(name, metrics):
                    metric = key.split(".", 1)[1]
                    panels.append((stage, key, evals.get("before", {}).get(name, {}).get(metric), metrics[metric]))

    fig = plt.figure(figsize=(14, 8.5))
    grid = fig.add_gridspec(2, max(len(panels), 1), height_ratios=[3, 2], hspace=0.45)
    top = fig.add_subplot(grid[0, :])
    # Each stage gets the same width (its own steps scaled into it): a 300-step pretrain and an
    # 8-step DPO stage are both readable.
    for i, stage in enumerate(stages):
        curves = stage_curves(run_dir, stage, [p["phase"] for p in ledger.get(stage, {}).get("phases", [])])
        total = sum(max(steps) for _, steps, _ in curves if steps) or 1
        done = 0
        for label, steps, losses in curves:
            if steps:
                top.plot([i + (done + s) / total for s in steps], losses, label=label, linewidth=1.2)
                done += max(steps)
        top.axvline(i, color="0.85", linewidth=0.8)
        top.text(i + 0.5, 1.0, f"{stage}\n{total} steps", transform=top.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    top.set_xlim(0, len(stages))
    top.set_xticks([])
    top.set_yscale("log")
    top.set_ylabel("training loss (log scale)")
    top.legend(fontsize=7, ncol=4, loc="lower left")
    for j, (stage, key, before, after) in enumerate(panels):
        ax = fig.add_subplot(grid[1, j])
        values = [0.0 if before is None else before, after]
        ax.bar([0, 1], values, color=["0.7", "tab:blue"])
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([0, 1], ["before", "after"], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{stage}\n" + key.replace(".", "\n"), fontsize=7)
        ax.set_ylim(0, max(values) * 1.25 or 1)
    fig.suptitle(f"run {run_dir.name}: training loss per stage, and each evaluation before → after its stage", fontsize=11)
    path = Path(out) if out else run_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
