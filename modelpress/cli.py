"""The ``modelpress`` command.

The core library's commands (no Prefect, MLflow or DVC)::

    modelpress stage NAME [--params ...] [-S section.key=value ...]    one step (what dvc.yaml calls)
    modelpress evaluate FILE [--params ...]                             top-1 of a packed file
    modelpress inspect FILE                                             what a packed file holds
    modelpress schema                                                   the parameter schema (JSON)
    modelpress dvc-yaml                                                 dvc.yaml, from the stages' declarations

and those the pipeline adds through the ``modelpress.commands`` entry point group
(``modelpress.flows.cli``): ``run``, ``sweep``, ``models``, ``reproduce``.

Errors print one line, ``modelpress: error: <cause>``, and exit with status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .atomic import workdir_lock
from .progress import error_line
from .stages.declare import STAGES as DECLARED

STAGES = (*(s.name for s in DECLARED), "point")  # point: compress..evaluate of one sweep point


def _recipe(args, checkout: str | Path = "params.yaml"):
    """The recipe of a command. ``checkout``: where the checkout's params.yaml is read from (the
    pipeline's commands pass the copy another run's versioning keeps while it holds the file)."""
    from .recipe import Recipe

    # Another --params file is merged onto the checkout's params.yaml: it may set only what differs;
    # --whole reads it alone (the pipeline's child processes pass the run's whole recipe, whose
    # empty fields must not take params.yaml's values).
    path = checkout if args.params == "params.yaml" else args.params
    return Recipe.from_yaml(path, args.set, base=None if getattr(args, "whole", False) else checkout)


def _table(rows: list[dict]) -> str:
    from .report import text_table

    return text_table(rows)


def _summary_rows(summary: dict) -> list[dict]:
    keys = ("teacher_top1", "compressed_top1", "top1_drop", "packed_bytes", "teacher_fp32_bytes", "compression_ratio", "test_images")
    rows = [{"metric": k, "value": summary.get(k)} for k in keys]
    if summary.get("metric"):  # the *_top1 figures measure something else (a text encoder: embedding cosine)
        rows.insert(0, {"metric": "measured as", "value": summary["metric"]})
    return rows


def cmd_stage(args) -> int:
    from . import stages

    recipe = _recipe(args)
    stages.preflight(recipe)  # bad layer names or budgets fail here, before any work
    if args.name in ("point", "evaluate"):  # a sweep's point (its own folder) and a run's evaluation (its lock held)
        return _stage(args, recipe)
    # `dvc repro` beside a run in the same folder stops here with one line: waiting would hold DVC's
    # lock on the stage's outputs, which the run's own `dvc commit` then finds busy.
    with workdir_lock(recipe.run.workdir, wait=False):
        return _stage(args, recipe)


def _stage(args, recipe) -> int:
    from . import stages

    if args.name == "fetch":
        print(stages.fetch(recipe))
    elif args.name == "teacher":
        print(stages.teacher(recipe, stages.resolve_weights(recipe.teacher.weights)))
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
    from .pack.model import decoded_tensors
    from .report import weight_values

    tensors = decoded_tensors(packed)  # no model built: a custom: architecture's file is read as well
    v = weight_values([t for n, t in tensors.items() if n.endswith("weight") and t.dim() > 1])
    print(f"weights: {v['weights']:,}, {v['unique_values']:,} distinct values network-wide, "
          f"entropy {v['entropy_bits']:.2f} bits per weight")
    return 0


def cmd_dvc_yaml(_args) -> int:
    from .stages import dvc_yaml

    print(dvc_yaml(), end="")
    return 0


def cmd_schema(_args) -> int:
    from .recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modelpress", description="Compress PyTorch models into small packed files.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (by default they go to the log file only)")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_params(p):
        p.add_argument("--params", default="params.yaml",
                       help="parameter file (YAML or JSON), default params.yaml; another file is merged onto params.yaml")
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. -S method.linear.k=128 (repeatable)")
        p.add_argument("--whole", action="store_true",
                       help="the --params file is a whole recipe: read it alone, not merged onto params.yaml")
        return p

    st = with_params(sub.add_parser("stage", help="run one stage (used by dvc.yaml)"))
    st.add_argument("name", choices=STAGES)
    st.add_argument("--json", action="store_true", help="print the result as JSON")
    st.set_defaults(fn=cmd_stage)
    ev = with_params(sub.add_parser("evaluate", help="top-1 of a packed file on the test set"))
    ev.add_argument("file")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(fn=cmd_evaluate)
    ins = sub.add_parser("inspect", help="show what a packed file holds")
    ins.add_argument("file")
    ins.set_defaults(fn=cmd_inspect)
    sub.add_parser("schema", help="print the parameter schema").set_defaults(fn=cmd_schema)
    sub.add_parser("dvc-yaml", help="print dvc.yaml, generated from the stages' declarations").set_defaults(fn=cmd_dvc_yaml)
    for ep in entry_points(group="modelpress.commands"):  # the pipeline's run, sweep, models, reproduce
        ep.load()(sub, with_params)
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
        msg = error_line(e)
        print(f"modelpress: error: {msg}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.debug:
        os.environ["MODELPRESS_DEBUG"] = "1"
    if not getattr(args, "own_logging", False):  # run and sweep: Prefect's logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return _one_line_errors(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
