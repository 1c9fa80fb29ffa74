"""The ``modelpress`` command.

    modelpress run [--params params.yaml] [-S section.key=value ...]   the whole pipeline (Prefect flow)
    modelpress stage NAME [--params ...]                                one step (what dvc.yaml calls)
    modelpress sweep SWEEP.yaml [--params ...] [-S ...]                 many points, the accuracy-vs-bytes front
    modelpress evaluate FILE [--params ...]                             top-1 of a packed file
    modelpress inspect FILE                                             what a packed file holds
    modelpress models list | show NAME[@ALIAS]                          the MLflow registry's models
    modelpress reproduce models:/NAME/VERSION                           restore a version's packed file (DVC)
    modelpress schema                                                   the parameter schema (JSON)

Errors print one line, ``modelpress: error: <cause>``, and exit with status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

STAGES = ("fetch", "teacher", "compress", "finetune", "pack", "evaluate", "point")


def _recipe(args):
    from .recipe import Recipe

    # Another --params file is merged onto the checkout's params.yaml: it may set only what differs.
    return Recipe.from_yaml(args.params, args.set, base="params.yaml")


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line([cell(r.get(c)) for c in cols]) for r in rows])


def _summary_rows(summary: dict) -> list[dict]:
    keys = ("teacher_top1", "compressed_top1", "top1_drop", "packed_bytes", "teacher_fp32_bytes", "compression_ratio", "test_images")
    return [{"metric": k, "value": summary.get(k)} for k in keys]


def cmd_run(args) -> int:
    recipe = _recipe(args)  # invalid parameters fail here, before any work
    from .stages import preflight

    if not os.environ.get(CHILD_ENV):  # the supervising parent checked already
        preflight(recipe)  # so do layer names, block sizes and budgets the architecture cannot take
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "modelpress")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home
    # The temporary Prefect server gets 90 s to start (Prefect's 20 s is missed on a loaded 2-core machine).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return _supervised(args.argv, lambda: _run_flow(recipe))


def _run_flow(recipe) -> int:
    from flows.compress import compress_flow

    summary = compress_flow(recipe)
    from .stages import paths

    print("\n" + _table(_summary_rows(summary)))
    print("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    print(f"packed model: {paths(recipe)['packed']}   metrics: {paths(recipe)['metrics']}")
    if "registered" in summary:
        r = summary["registered"]
        print(f"registered: {r['model_name']} version {r['version']} (models:/{r['model_name']}/{r['version']}; "
              f"{r['promotion']})")
    return 0


def cmd_stage(args) -> int:
    from . import stages

    recipe = _recipe(args)
    stages.preflight(recipe)  # bad layer names or budgets fail here, before any work
    if args.name == "fetch":
        print(stages.fetch(recipe))
    elif args.name == "teacher":
        weights = recipe.teacher.weights
        if weights and weights.startswith(("models:/", "runs:/")):
            from tasks.resolve import resolve_teacher_weights

            weights = resolve_teacher_weights(weights)
        print(stages.teacher(recipe, weights))
    elif args.name == "compress":
        print(stages.compress_stage(recipe))
    elif args.name == "finetune":
        print(stages.finetune_stage(recipe))
    elif args.name == "pack":
        print(stages.pack_stage(recipe))
    elif args.name == "point":  # compress..evaluate of one sweep point (what a sweep's worker process runs)
        from .sweep import run_point

        rec = run_point(recipe)
        print(json.dumps(rec) if args.json else _table(_summary_rows(rec["summary"])))
    elif args.name == "evaluate":
        p = stages.paths(recipe)
        summary = stages.summarize(recipe, stages.evaluate_file(p["packed"], recipe))
        print(json.dumps(summary) if args.json else _table(_summary_rows(summary)))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import SweepConfig

    sweep = SweepConfig.from_yaml(args.sweep, _recipe(args))
    if args.concurrency:
        sweep = sweep.model_copy(update={"concurrency": args.concurrency})
    from .stages import preflight

    for name, recipe in sweep.expand():  # every point's settings, before any work
        try:
            preflight(recipe)
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "modelpress")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MODELPRESS_DVC", "off")
    return _supervised(args.argv, lambda: _run_sweep(sweep))


def _run_sweep(sweep) -> int:
    from flows.sweep import sweep_flow

    record = sweep_flow(sweep)
    from .report import markdown_table
    from .sweep import COLUMNS

    print("\n" + markdown_table(record["points"], COLUMNS))
    print(f"\nwall {record['wall_s']:.0f} s for {record['sum_point_s']:.0f} s of point time "
          f"({record['reused']} points finished before); failed: {', '.join(record['failed']) or 'none'}")
    print(f"results: {sweep.root()}/ (front.md, front.csv, front.png, sweep.json)")
    return 1 if record["failed"] else 0


def cmd_evaluate(args) -> int:
    from .stages import evaluate_file

    result = evaluate_file(Path(args.file), _recipe(args), args.limit)
    print(json.dumps(result) if args.json else _table([result]))
    return 0


def cmd_inspect(args) -> int:
    from .pack import read_packed

    packed = read_packed(args.file)
    print(f"{args.file}: {packed.size:,} bytes, architecture {packed.arch['name']} {packed.arch.get('kwargs', {})}")
    if "method" in packed.meta:
        print(f"method: {packed.meta['method']}")
    print(_table(packed.summary()))
    return 0


def cmd_models(args) -> int:
    """Registry views for people without the MLflow UI (needs MLflow, not Prefect)."""
    from tasks import registry

    if args.action == "list":
        print(_table(registry.list_rows()))
        return 0
    if not args.ref:
        raise ValueError("models show needs NAME, NAME@ALIAS or NAME/VERSION")
    v = registry.resolve(args.ref)
    aliases = ", ".join(getattr(v, "aliases", []) or []) or "-"
    print(f"{v.name} version {v.version}  aliases: {aliases}  source: {v.source}")
    width = max((len(k) for k in v.tags), default=0)
    print("\n".join(f"  {k.removeprefix(registry.TAG):<{width}}  {val}" for k, val in sorted(v.tags.items())))
    if v.description:
        print("\n" + v.description)
    return 0


def cmd_reproduce(args) -> int:
    """Restore a registered version's packed file from its lineage (needs MLflow and DVC)."""
    from tasks.reproduce import reproduce

    reproduce(args.ref, Path(args.repo))
    return 0


def cmd_schema(_args) -> int:
    from .recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modelpress", description="Compress PyTorch models into small packed files.")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_params(p):
        p.add_argument("--params", default="params.yaml",
                       help="parameter file (YAML or JSON), default params.yaml; another file is merged onto params.yaml")
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. -S method.linear.k=128 (repeatable)")
        return p

    with_params(sub.add_parser("run", help="run the whole pipeline as a Prefect flow")).set_defaults(fn=cmd_run)
    st = with_params(sub.add_parser("stage", help="run one stage (used by dvc.yaml)"))
    st.add_argument("name", choices=STAGES)
    st.add_argument("--json", action="store_true", help="print the result as JSON")
    st.set_defaults(fn=cmd_stage)
    sw = with_params(sub.add_parser("sweep", help="compress at many points; the accuracy-vs-bytes front"))
    sw.add_argument("sweep", help="sweep file (YAML): name, points, budgets, concurrency, runner")
    sw.add_argument("--concurrency", type=int, default=None, help="points computed at once (overrides the file)")
    sw.set_defaults(fn=cmd_sweep)
    ev = with_params(sub.add_parser("evaluate", help="top-1 of a packed file on the test set"))
    ev.add_argument("file")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(fn=cmd_evaluate)
    ins = sub.add_parser("inspect", help="show what a packed file holds")
    ins.add_argument("file")
    ins.set_defaults(fn=cmd_inspect)
    mo = sub.add_parser("models", help="registered models: list, or show NAME[@ALIAS]")
    mo.add_argument("action", choices=("list", "show"))
    mo.add_argument("ref", nargs="?", help="NAME, NAME@ALIAS or NAME/VERSION (for show)")
    mo.set_defaults(fn=cmd_models)
    rp = sub.add_parser("reproduce", help="restore a registered version's packed file in this checkout (DVC pull)")
    rp.add_argument("ref", help="models:/NAME/VERSION, NAME/VERSION or NAME@ALIAS")
    rp.add_argument("--repo", default=".", help="the checkout to restore into (default: here)")
    rp.set_defaults(fn=cmd_reproduce)
    sub.add_parser("schema", help="print the parameter schema").set_defaults(fn=cmd_schema)
    return ap


def _one_line_errors(fn) -> int:
    """Run ``fn``; every failure ends as one line on stderr and an exit status."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `modelpress schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every failure ends as one clear line
        if os.environ.get("MODELPRESS_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"modelpress: error: {msg}", file=sys.stderr)
        return 1


STOP_GRACE_S = 5.0


def _stop_tree(pid: int, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to a process and every descendant (the temporary Prefect server, evaluation and
    sweep-point processes), SIGKILL to whatever is left after ``grace`` seconds."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


CHILD_ENV = "MODELPRESS_SUPERVISED_CHILD"


def _supervised(argv: list[str], work) -> int:
    """Run ``work`` (a flow) in a child process running this same command, and wait for it.
    SIGTERM or SIGINT (Ctrl-C) to this process stops the child and all its descendants within
    seconds and exits 143/130: nothing keeps running, and since every stage checkpoints and
    writes atomically, running the same command again resumes where it stopped. (The flow does
    not run in this process because Prefect takes over SIGTERM during a flow run and its
    graceful shutdown can wait on the temporary server for ever.)"""
    if os.environ.get(CHILD_ENV):
        return work()
    sys.stdout.flush()
    sys.stderr.flush()
    child = subprocess.Popen([sys.executable, "-m", "modelpress", *argv], env={**os.environ, CHILD_ENV: "1"})

    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nmodelpress: stopping ({signal.Signals(signum).name}); run the same command again to resume",
              file=sys.stderr, flush=True)
        _stop_tree(child.pid)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return child.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.command not in ("run", "sweep"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return _one_line_errors(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
