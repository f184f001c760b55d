"""``phi4-engine`` command line (contract in DESIGN.md).

Exit codes: 0 success; 2 usage or spec error; other non-zero with a one-line reason. Expected
user errors never print a Python traceback (set PHI4_ENGINE_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from phi4_engine.errors import EngineError, UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi4-engine", description="Train a Phi-4-style model through the whole recipe.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a spec's stages (skips finished ones, resumes the interrupted one)")
    run.add_argument("spec")
    run.add_argument("--run-dir", help="run directory (default: runs/<spec name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V", help="override a spec field, e.g. stages.pretrain.steps=50")
    run.add_argument("--stages", help="comma-separated stage names to run")
    run.add_argument("--nproc", type=int, default=1, help="processes on this node (launched through torchrun)")
    run.add_argument("--reshard", action="store_true",
                     help="let an unfinished stage continue under a different --nproc (recorded in the ledger)")

    validate = sub.add_parser("validate", help="check a spec against the installed plugins")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")

    evaluate = sub.add_parser("eval", help="run a finished stage's evaluations again on its final weights")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--stage", help="stage name (default: the last finished stage)")

    plugins = sub.add_parser("plugins", help="list installed plugins, their hooks and kinds")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = data.add_parser("prepare", help="tokenize a stage's data sources once into memory-mapped token shards")
    prepare.add_argument("spec")
    prepare.add_argument("--out", required=True, help="output directory (new or empty; see --force)")
    prepare.add_argument("--stage", help="stage whose data.sources to prepare (default: the first that has some)")
    prepare.add_argument("--workers", type=int, help="tokenizer processes (default: the CPU count)")
    prepare.add_argument("--force", action="store_true", help="replace what --out holds")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")

    plan = sub.add_parser("plan", help="per stage: tokens, steps, FLOPs, memory per GPU and days (nothing runs)")
    plan.add_argument("spec")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1: FSDP2 over every GPU)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume (default 0.4)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (default 989, H100)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    plan.add_argument("--dpo-row-tokens", type=int, default=2048, help="tokens per DPO row to assume (default 2048)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")

    pts = sub.add_parser("pts", help="report of a run's Pivotal Token Search: pairs, rollouts, cache hits, p-jump histogram")
    pts.add_argument("run_dir")
    pts.add_argument("--stage", help="the dpo-pivotal stage's name (default: the first dpo-pivotal stage)")
    pts.add_argument("--json", action="store_true", help="machine-readable output")

    export = sub.add_parser("export", help="write a finished stage's weights as a Hugging Face Phi3ForCausalLM folder")
    export.add_argument("run_dir")
    export.add_argument("--stage", help="stage name (default: the last finished stage)")
    export.add_argument("--format", default="hf", choices=["hf"], help="output format (hf: safetensors + config + tokenizer)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--out", required=True, help="output folder (new or empty)")

    report = sub.add_parser("report", help="a PNG of a run's loss curves and evaluations across its stages")
    report.add_argument("run_dir")
    report.add_argument("--out", help="where to write the picture (default: RUN_DIR/report.png)")

    sub.add_parser("stages", help="list stage kinds")
    sub.add_parser("schema", help="print the JSON Schema of specs (with plugin kinds)")
    return parser


def _engine(spec: str, overrides: list[str], run_dir: str | None = None):
    from phi4_engine.engine import Engine

    return Engine.from_file(spec, overrides=overrides, run_dir=run_dir)


def _cmd_validate(args: argparse.Namespace) -> int:
    engine = _engine(args.spec, args.overrides)
    spec = engine.validate()
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in spec.stages)  # type: ignore[attr-defined]
    print(f"{args.spec}: ok — {spec.name}: {kinds}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from phi4_engine.plan import Hardware, format_plan, model_numbers

    engine = _engine(args.spec, args.overrides)
    hw = Hardware(args.gpus, args.peak_tflops, args.mfu, args.gpu_memory)
    plans = engine.plan(hw, tp=args.tp, dpo_row_tokens=args.dpo_row_tokens)
    if args.json:
        print(json.dumps([asdict(p) for p in plans], indent=2))
        return 0
    spec = engine.validate()
    vocab = engine.registry.build("tokenizer", spec.tokenizer).vocab_size
    print(format_plan(plans, model_numbers(spec.model.flavor, vocab), hw, args.tp))
    return 0


def _cmd_pts(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phi4_engine.stages.dpo_pivotal import format_report

    # Read the run's own resolved spec as data (no plugins needed: a third-party verifier the
    # search used need not be importable to print its report).
    spec_path = Path(args.run_dir) / "spec.json"
    if not spec_path.exists():
        raise UsageError(f"{args.run_dir}: not a run directory (no spec.json)")
    stages = json.loads(spec_path.read_text()).get("stages", [])
    names = [s.get("name") or s["kind"] for s in stages if s.get("kind") == "dpo-pivotal"]
    stage = args.stage or (names[0] if names else None)
    if stage not in names:
        raise UsageError(f"{args.run_dir}: no dpo-pivotal stage named {stage!r} (dpo-pivotal stages: {', '.join(names) or 'none'})")
    path = Path(args.run_dir) / stage / "data" / "pairs-report.json"
    if not path.exists():
        raise EngineError(f"{path}: no search report yet; run the stage first (phi4-engine run SPEC --stages ...,{stage})")
    report = json.loads(path.read_text())
    print(json.dumps(report, indent=2) if args.json else format_report(stage, report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from phi4_engine.engine import Engine

    print(Engine.from_run_dir(args.run_dir).export(args.out, stage=args.stage, format=args.format, dtype=args.dtype))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from phi4_engine.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from phi4_engine.engine import Engine

    print(json.dumps(Engine.from_run_dir(args.run_dir).evaluate(args.stage), indent=2))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from phi4_engine.engine import Engine

    infos = Engine({"name": "plugins", "stages": []}).plugins()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    for info in infos:
        kinds = "; ".join(f"{cat}: {', '.join(k)}" for cat, k in info.kinds.items()) or "-"
        print(f"{info.name:<14} {info.distribution} {info.version:<8} {kinds}")
        print(f"{'':<14} hooks: {', '.join(info.hooks)}")
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from phi4_engine.engine import Engine

    engine = Engine({"name": "stages", "stages": []})
    for kind, reg in engine.registry.kinds["stage"].items():
        doc = (reg.spec_model.__doc__ or "").strip().splitlines()[0] if reg.spec_model.__doc__ else ""
        print(f"{kind:<12} {reg.origin.name:<10} {doc}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from phi4_engine.engine import Engine

    print(json.dumps(Engine({"name": "schema", "stages": []}).schema(), indent=2))
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command in ``nproc`` processes on this node through torchrun's launcher
    (torch.distributed.run: rendezvous, per-rank environment, failure handling). Returns rank
    0's exit code, so errors keep their meaning (the ranks print nothing but rank 0)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher logs each failed worker at ERROR; rank 0 has already said why in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"phi4-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "phi4_engine.cli", *argv)
    except ChildFailedError as exc:
        # A rank that failed on its own exits > 0; the others were then stopped by a signal (< 0).
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        own = [codes[r] for r in sorted(codes, key=lambda r: r != 0) if codes[r] > 0]
        return own[0] if own else 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        argv, skip = [], False
        for arg in args.argv:  # the same command without --nproc
            if skip or arg.startswith("--nproc="):
                skip = False
                continue
            if arg == "--nproc":
                skip = True
                continue
            argv.append(arg)
        return _launch(args.nproc, argv)
    engine = _engine(args.spec, args.overrides, args.run_dir)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    result = engine.run(stages, reshard=args.reshard)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(result)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from phi4_engine.data.prepare import prepare

    manifest = prepare(_engine(args.spec, args.overrides), args.out, stage=args.stage, workers=args.workers, force=args.force)
    for s in manifest["sources"]:
        print(f"{s['name']}: {s['documents']} documents, {s['tokens']} tokens, {len(s['shards'])} shard(s)")
    print(f"{args.out}: prepared ({manifest['origin']['stage']})")
    return 0


def headline_metrics(evals: dict[str, Any]) -> list[str]:
    """``name.metric before → after`` for each evaluation's headline metric(s)."""
    from phi4_engine.report import headline

    out = []
    before, after = evals.get("before", {}), evals.get("after", {})
    for name, metrics in after.items():
        for key in headline(name, metrics):
            metric = key.split(".", 1)[1]
            old = before.get(name, {}).get(metric)
            out.append(f"{key} {'-' if old is None else f'{old:.3g}'} → {metrics[metric]:.3g}")
    return out


def _print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_dir}")
    for column in ("stage", "status", "steps", "tokens", "time", "loss first → last", "evaluations before → after"):
        table.add_column(column)
    for name, stage in result.stages.items():
        m, summary = stage.metrics, stage.summary
        first, last = m.get("loss_first"), m.get("loss_last")
        loss = f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "-"
        took = summary.get("finished", 0) - summary.get("started", 0) if summary.get("started") else None
        tokens = summary.get("tokens")
        table.add_row(name, stage.status, str(summary.get("steps", "-")), f"{tokens:,}" if tokens else "-",
                      "-" if took is None else f"{took / 60:.1f} min", loss, "\n".join(headline_metrics(summary.get("eval", {}))) or "-")
    Console(file=sys.stderr, width=200).print(table)


COMMANDS = {"eval": _cmd_eval, "plan": _cmd_plan, "pts": _cmd_pts, "report": _cmd_report, "export": _cmd_export, "run": _cmd_run, "validate": _cmd_validate, "plugins": _cmd_plugins, "stages": _cmd_stages, "schema": _cmd_schema, "data": _cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except EngineError as exc:
        if os.environ.get("PHI4_ENGINE_DEBUG") == "1":
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one message, from rank 0
            print(f"phi4-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("phi4-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
