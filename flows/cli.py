"""The pipeline's commands, added to ``modelpress`` (entry point group ``modelpress.commands``):

    modelpress run [--params params.yaml] [-S section.key=value ...]   the whole pipeline (Prefect flow)
    modelpress sweep SWEEP.yaml [--params ...] [-S ...]                 many points, the accuracy-vs-bytes front
    modelpress models list | show NAME[@ALIAS]                          the MLflow registry's models
    modelpress reproduce models:/NAME/VERSION                           restore a version's packed file (DVC)

Prefect, MLflow and DVC are imported only when one of these runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from modelpress.cli import _recipe, _summary_rows, _table


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_commands(sub, with_params) -> None:
    """Add this module's subcommands to the ``modelpress`` parser."""
    run = with_params(sub.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    run.set_defaults(fn=cmd_run, own_logging=True)
    sw = with_params(sub.add_parser("sweep", help="compress at many points; the accuracy-vs-bytes front"))
    sw.add_argument("sweep", help="sweep file (YAML): name, points, budgets, concurrency, runner")
    sw.add_argument("--concurrency", type=_positive, default=None, help="points computed at once (overrides the file)")
    sw.set_defaults(fn=cmd_sweep, own_logging=True)
    mo = sub.add_parser("models", help="registered models: list, or show NAME[@ALIAS]")
    mo.add_argument("action", choices=("list", "show"))
    mo.add_argument("ref", nargs="?", help="NAME, NAME@ALIAS or NAME/VERSION (for show)")
    mo.set_defaults(fn=cmd_models)
    rp = sub.add_parser("reproduce", help="restore a registered version's packed file in this checkout (DVC pull)")
    rp.add_argument("ref", help="models:/NAME/VERSION, NAME/VERSION or NAME@ALIAS")
    rp.add_argument("--repo", default=".", help="the checkout to restore into (default: here)")
    rp.set_defaults(fn=cmd_reproduce)


def _checkout_recipe(args):
    """The command's recipe, from the checkout's own parameters even while another run's DVC
    versioning holds params.yaml, or after a run was killed there."""
    from modelpress.tasks.versioning import checkout_params

    return _recipe(args, checkout_params())


def cmd_run(args) -> int:
    recipe = _checkout_recipe(args)  # invalid parameters fail here, before any work
    from modelpress.stages import preflight

    if not os.environ.get(CHILD_ENV):  # the supervising parent checked already
        preflight(recipe)  # so do layer names, block sizes and budgets the architecture cannot take
        if recipe.registry.enabled:
            from modelpress.tasks.registry import check_reachable

            check_reachable()  # a tracking server that does not answer fails now, not after the run
        from modelpress.atomic import workdir_lock

        with workdir_lock(recipe.run.workdir, wait=False):  # another run there: one line now, not a wait
            pass
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "modelpress")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home
    # The temporary Prefect server gets 90 s to start (Prefect's 20 s is missed on a loaded 2-core machine).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return _supervised(args.argv, lambda: _run_flow(recipe), Path(recipe.run.workdir) / "logs")


def _run_flow(recipe) -> int:
    from modelpress.flows.compress import compress_flow

    summary = compress_flow(recipe)
    from modelpress.stages import paths

    print("\n" + _table(_summary_rows(summary)))
    print("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    print(f"packed model: {paths(recipe)['packed']}   metrics: {paths(recipe)['metrics']}")
    if "registered" in summary:
        r = summary["registered"]
        print(f"registered: {r['model_name']} version {r['version']} (models:/{r['model_name']}/{r['version']}; "
              f"{r['promotion']})")
    return 0


def cmd_sweep(args) -> int:
    from modelpress.sweep import SweepConfig

    sweep = SweepConfig.from_yaml(args.sweep, _checkout_recipe(args))
    if args.concurrency:
        sweep = sweep.model_copy(update={"concurrency": args.concurrency})
    from modelpress.stages import preflight

    for name, recipe in sweep.expand():  # every point's settings, before any work
        try:
            preflight(recipe)
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
    if not os.environ.get(CHILD_ENV):
        with sweep.lock(wait=False):  # this sweep running already: one line now, not a wait
            pass
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "modelpress")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MODELPRESS_DVC", "off")
    return _supervised(args.argv, lambda: _run_sweep(sweep), sweep.root() / "logs")


def _run_sweep(sweep) -> int:
    from modelpress.flows.sweep import sweep_flow

    state = sweep_flow(sweep, return_state=True)  # Failed when a point failed, with the others' record as its data
    record = state.result(raise_on_failure=False)
    if isinstance(record, BaseException):
        raise record
    from modelpress.report import markdown_table
    from modelpress.sweep import COLUMNS

    print("\n" + markdown_table(record["points"], COLUMNS))
    print(f"\nwall {record['wall_s']:.0f} s for {record['sum_point_s']:.0f} s of point time "
          f"({record['reused']} points finished before); failed: {', '.join(record['failed']) or 'none'}")
    print(f"results: {sweep.root()}/ (front.md, front.csv, front.png, sweep.json)")
    return 1 if record["failed"] else 0


def cmd_models(args) -> int:
    """Registry views for people without the MLflow UI (needs MLflow, not Prefect)."""
    from modelpress.tasks import registry

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
    from modelpress.tasks.reproduce import reproduce

    reproduce(args.ref, Path(args.repo))
    return 0


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


class TracebackFilter:
    """Drops Python tracebacks from a stream of lines: the terminal gets the one-line errors,
    the log file everything (``--debug`` / ``MODELPRESS_DEBUG=1``: the terminal too)."""

    CHAIN = ("The above exception was the direct cause", "During handling of the above exception")

    def __init__(self) -> None:
        self.skipping = False
        self.after = False  # just past a traceback: drop blank and chaining lines

    def keep(self, line: str) -> bool:
        s = line.rstrip("\r\n")
        if s.startswith(("Traceback (most recent call last):", "Exception Group Traceback")):
            self.skipping, self.after = True, False
            return False
        if self.skipping:
            if not s or s[0] in " \t|+^~":
                return False
            self.skipping, self.after = False, True  # the exception's own line: the error line says it
            return False
        if self.after and (not s.strip() or s.startswith(self.CHAIN)):
            return False
        self.after = False
        return True


def _relay(stream, log, out, keep, held: list[bytes]) -> None:
    """Child's stderr to the log (all) and the terminal (``keep``); the child's error line is
    held back and written last, after whatever shutdown logs follow it."""
    for raw in iter(stream.readline, b""):
        log.write(raw)
        log.flush()
        if raw.startswith(b"modelpress: error: "):
            held.append(raw)
        elif keep(raw.decode(errors="replace")):
            out.write(raw)
            out.flush()


def _supervised(argv: list[str], work, log_dir: Path) -> int:
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
    log_dir.mkdir(parents=True, exist_ok=True)
    command = next(a for a in argv if not a.startswith("-"))
    log_path = log_dir / f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - open while the child runs
    print(f"modelpress: log (with tracebacks): {log_path}", file=sys.stderr, flush=True)
    child = subprocess.Popen([sys.executable, "-m", "modelpress", *argv], env={**os.environ, CHILD_ENV: "1"},
                             stderr=subprocess.PIPE)
    debug = bool(os.environ.get("MODELPRESS_DEBUG"))
    held: list[bytes] = []
    relay = threading.Thread(target=_relay, daemon=True, args=(child.stderr, log, sys.stderr.buffer,
                                                               (lambda _l: True) if debug else TracebackFilter().keep, held))
    relay.start()

    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nmodelpress: stopping ({signal.Signals(signum).name}); run the same command again to resume",
              file=sys.stderr, flush=True)
        _stop_tree(child.pid)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = child.wait()
    relay.join(timeout=10)
    log.close()
    for line in held:
        sys.stderr.buffer.write(line)
    sys.stderr.flush()
    return code
