"""Size sweeps: one teacher, many compression points, and the accuracy-vs-bytes front.

A sweep is a base recipe plus named points, each a set of ``section.key: value`` overrides
(any method and its knobs, or just a byte budget). Every point is an ordinary compression run
in its own folder; they share the sweep's dataset and teacher. Plain library code: this
module defines the points, runs one (:func:`sweep_point`, the one point runner: reuse a
finished point, else compute it in its own process) and writes the results. The Prefect flow
(flows/sweep.py) fans the points out through it; :func:`run_local` runs a whole sweep with the
library alone (no Prefect, MLflow or DVC), for a machine with PyTorch and little else::

    python -m modelpress.sweep SWEEP.yaml --params P.yaml [--whole] [-S k=v] [--only a,b] [--concurrency N]
        [--threads N] [--workdir DIR] [--deadline-s N] [--out results.json]

Folder of a sweep (``workdir``, default ``<run.workdir>/sweeps/<name>``)::

    datasets/  teacher/           shared by every point
    points/<point>/               one compression run (compress/, finetune/, model.mpk, metrics.json)
    points/<point>/point.json     the point's result; present = finished (a rerun skips it)
    sweep.json                    every point's row, the teacher, wall and point times
    front.md, front.csv           the table, Pareto-front points marked
    front.png                     top-1 vs packed bytes (log scale)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .atomic import FolderBusy, folder_lock
from .progress import error_line
from .recipe import Recipe, RecipeError, read_mapping

POINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a point may not change: the sweep compares points on one teacher, one dataset.
SHARED = ("data.", "teacher.", "run.workdir", "run.seed", "registry.")


def _safe_name(v: str) -> str:
    """Sweep and point names become folder, run and model names."""
    if not POINT_NAME.match(v):
        raise ValueError(f"name {v!r}: use letters, digits, '_', '.', '-'")
    return v


Name = Annotated[str, AfterValidator(_safe_name)]


class SweepPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = Field(description="Point name: its folder, run name and row label.")
    set: dict[str, Any] = Field({}, description="Overrides of the base recipe, e.g. {method.name: kmeans, method.bits: 4}.")
    series: str | None = Field(None, description="Legend group in the table and plot; default: the method's name.")

    @field_validator("set")
    @classmethod
    def _not_shared(cls, v: dict[str, Any]) -> dict[str, Any]:
        def keys(key: str, value: Any):  # a section given as a mapping ({run: {seed: 7}}) is its fields
            if isinstance(value, dict) and value:
                for k, sub in value.items():
                    yield from keys(f"{key}.{k}", sub)
            else:
                yield key

        for key in (k for top, value in v.items() for k in keys(top, value)):
            if key.startswith(SHARED) or key in ("data", "teacher", "registry"):
                raise ValueError(f"override {key!r}: the teacher, data, seed, folder and registry are the sweep's, "
                                 "set them in the base recipe")
        return v


class SweepConfig(BaseModel):
    """A sweep: the base recipe, its points, and how to run them."""

    model_config = ConfigDict(extra="forbid")
    name: Name = Field("sweep", description="Sweep name (folder, MLflow parent run, registered model).")
    base: Recipe = Field(Recipe(), description="The recipe every point starts from (teacher, data, fine-tuning...).")
    points: list[SweepPoint] = Field([], description="Named points, each a set of overrides of the base recipe.")
    budgets: list[int] = Field([], description="Shorthand: one PQ point per byte budget (method.target_bytes).")
    concurrency: int = Field(2, ge=1, le=256, description="Points computed at the same time.")
    point_timeout_h: float = Field(48, gt=0, description="A point still computing after this many hours is stopped and reported "
                                                         "as failed (a rerun of the sweep resumes it from its checkpoints).")
    workdir: str | None = Field(None, description="The sweep's folder; default <base run.workdir>/sweeps/<name>.")
    runner: Literal["local", "deployment"] = Field(
        "local", description="local: each point in a worker process here; deployment: each point is a run of "
                             "the compression deployment (run_deployment), i.e. on the work pool's machines.")
    deployment: str = Field("modelpress-compress/on-demand", description="Deployment the points run on (runner=deployment).")
    model_name: str | None = Field(None, description="Registered model of every point; default <teacher arch>-<name>.")

    @model_validator(mode="after")
    def _points(self) -> SweepConfig:
        names = [p.name for p in self.all_points()]
        if not names:
            raise ValueError("a sweep needs at least one point (points or budgets)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"point names must be unique: {', '.join(dup)}")
        if self.runner == "deployment" and not self.base.registry.enabled:
            raise ValueError("runner 'deployment' reads each point's result from the model registry: "
                             "registry.enabled must be true")
        return self

    def all_points(self) -> list[SweepPoint]:
        extra = [SweepPoint(name=f"pq-{b}B", series="pq (byte budget)", set={"method.name": "pq", "method.target_bytes": b})
                 for b in self.budgets]
        return list(self.points) + extra

    def series_of(self, name: str) -> str | None:
        return next((p.series for p in self.all_points() if p.name == name), None)

    def root(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(self.base.run.workdir) / "sweeps" / self.name

    def lock(self, wait: bool = True) -> contextlib.AbstractContextManager[None]:
        """One run of a sweep at a time in its folder (two would write the shared teacher, the
        points and the front at once): ``wait=False`` refuses at once naming the holder (the
        commands), else waits (a scheduled run). The points run under it; a deployment sweep's
        points under their own runs' locks, on the workers."""
        return folder_lock(self.root(), wait, what="sweep folder", user="sweep", skip=("points",))

    def point_threads(self) -> int:
        """CPU threads of each local point: the cores shared out between concurrent points."""
        return max(1, (os.cpu_count() or 1) // self.concurrency)

    def registered_name(self) -> str:
        return self.model_name or f"{self.base.arch_slug()}-{self.name}"

    def shared_recipe(self) -> Recipe:
        """The recipe of the shared steps (dataset, teacher), rooted at the sweep's folder."""
        return self.base.model_copy(update={"run": self.base.run.model_copy(update={"workdir": str(self.root())})})

    def expand(self) -> list[tuple[str, Recipe]]:
        """(point name, its full recipe) for every point. Raises RecipeError naming the point."""
        out = []
        for p in self.all_points():
            r = self.base.with_overrides(p.set, source=f"sweep {self.name}, point {p.name}")
            r = r.with_overrides({"run.name": f"{self.name}-{p.name}", "run.workdir": str(self.root() / "points" / p.name),
                                  "run.version_outputs": False, "registry.model_name": self.registered_name()})
            out.append((p.name, r))
        seen: dict[str, str] = {}
        for name, r in out:  # the same settings twice: computed twice and shown as a difference that is noise
            same = r.model_dump_json(exclude={"run": {"name", "workdir"}})
            if same in seen:
                raise RecipeError(f"sweep {self.name}: points {seen[same]} and {name} have the same settings "
                                  "(a setting equal to the base recipe's changes nothing)")
            seen[same] = name
        return out

    @classmethod
    def from_yaml(cls, path: str | Path, base: Recipe) -> SweepConfig:
        """Read a sweep file (name, points, budgets, concurrency, ...; the base recipe comes
        from params.yaml). Raises RecipeError naming the problem."""
        from pydantic import ValidationError

        path = Path(path)
        raw = read_mapping(path, "sweep file")
        if "base" in raw:
            raise RecipeError(f"{path}: 'base' comes from the parameter file (--params), not the sweep file")
        try:
            return cls.model_validate({**raw, "base": base})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise RecipeError(f"{path}: {where}: {err['msg']}") from None


# ---- one point ----------------------------------------------------------------------------

def link_shared(recipe: Recipe, root: Path) -> None:
    """Give a point's folder the sweep's dataset, teacher and cache (relative symlinks)."""
    for sub in ("datasets", "teacher", "cache"):
        target, link = root / sub, Path(recipe.run.workdir) / sub
        target.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() and not link.exists():
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def point_key(recipe: Recipe) -> str:
    from .stages import stage_key

    return recipe.section_hash("pack", "data", extra=stage_key(recipe, "evaluate"))  # every stage's settings and code


def point_path(recipe: Recipe) -> Path:
    return Path(recipe.run.workdir) / "point.json"


def finished_point(recipe: Recipe) -> dict | None:
    """The point's result if it finished with these exact settings and its file is intact."""
    from .data import sha256_file
    from .stages import paths, read_json

    rec = read_json(point_path(recipe))
    packed = paths(recipe)["packed"]
    if not rec or rec.get("key") != point_key(recipe) or not packed.is_file():
        return None
    return rec if sha256_file(packed) == rec["summary"]["packed_sha256"] else None


def run_point(recipe: Recipe) -> dict:
    """Compress, fine-tune, pack and evaluate one point in this process (the teacher must be
    there): what :func:`sweep_point`'s child process runs (``modelpress stage point``). The
    result is written to point.json last, so a killed point leaves no result and is redone,
    continuing from its own checkpoints."""
    from . import stages

    done = finished_point(recipe)
    if done is not None:
        return done
    stages.preflight(recipe)
    seconds, t_all = {}, time.perf_counter()
    for name, fn in (("compress", stages.compress_stage), ("finetune", stages.finetune_stage), ("pack", stages.pack_stage)):
        t0 = time.perf_counter()
        fn(recipe)
        seconds[name] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    summary = stages.evaluate_in_fresh_process(recipe)  # as the compression flow measures, as a consumer loads
    seconds["evaluate"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    rec = {"key": point_key(recipe), "summary": summary, "seconds": seconds,
           "key_params": recipe.method.key_params(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    stages.write_json(point_path(recipe), rec)
    return rec


class PointTimeout(TimeoutError):
    """A point ran past its time limit (point_timeout_h): reported as failed, not retried within
    the sweep (a rerun of the sweep resumes it from its checkpoints)."""

    transient = False


def run_point_process(recipe: Recipe, threads: int, timeout_s: float | None = None, name: str = "point",
                      log: Callable[[str], None] | None = None, timeout_why: str = "sweep point_timeout_h") -> dict:
    """:func:`run_point` in a child process (``modelpress stage point``) with ``threads`` CPU
    threads: true parallelism, and a crash or an out-of-memory kill takes down one point only.
    Each line it logs goes to ``log``; it is killed after ``timeout_s`` (TimeoutError)."""
    from .stages import die_with_parent, stage_command

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    last = ""
    with stage_command("point", recipe) as cmd:
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env,
                                    preexec_fn=die_with_parent if sys.platform == "linux" else None)
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                proc.kill()

            watchdog = threading.Timer(timeout_s, kill) if timeout_s else None
            if watchdog:
                watchdog.start()
            assert proc.stderr is not None  # stderr=PIPE
            try:
                for line in proc.stderr:
                    line = line.rstrip()
                    if line:
                        last = line
                        if log:
                            log(line)
                proc.wait()
            finally:
                if watchdog:
                    watchdog.cancel()
            out.seek(0)
            stdout = out.read()
    if proc.returncode != 0:
        if timed_out.is_set():  # (Timer.finished is also set by cancel(): not a timeout sign)
            raise PointTimeout(f"point {name} timed out after {timeout_s:.0f} s ({timeout_why})")
        raise RuntimeError(f"point {name} failed (exit {proc.returncode}): {last}")
    return json.loads(stdout.strip().splitlines()[-1])


class NotStarted(RuntimeError):
    """A point left unstarted because the run's deadline had passed."""


def sweep_point(sweep: SweepConfig, name: str, recipe: Recipe, timeout_s: float | None = None,
                log: Callable[[str], None] | None = None, threads: int | None = None,
                timeout_why: str = "sweep point_timeout_h", gate: contextlib.AbstractContextManager | None = None,
                deadline: float | None = None, note: Callable[[str], None] | None = None,
                deadline_why: str = "deadline") -> dict:
    """One local point of ``sweep``: what every sweep runner calls (the Prefect task, :func:`run_local`).

    A point that already finished with these settings (:func:`finished_point`) is returned as
    it is, ``reused: True``. Otherwise, once ``gate`` (a concurrency limit) lets it, it is
    computed in its own process (:func:`run_point_process`) with the sweep's shared dataset,
    teacher and cache, killed after ``timeout_s`` or at ``deadline`` (a ``time.perf_counter()``
    instant: :class:`NotStarted` if that has passed before it starts), whichever comes first,
    the report naming which (``timeout_why``, ``deadline_why``); its point.json gets the
    wall time seen here, ``reused: False``. ``log`` gets the point process's lines, ``note``
    this function's own (finished before, starting)."""
    done = finished_point(recipe)
    if done is not None:
        if note:
            note(f"point {name}: finished before ({done['summary']['packed_bytes']} bytes, "
                 f"top-1 {done['summary']['compressed_top1']:.2f}%), not recomputed")
        return {**done, "reused": True}
    threads = threads or sweep.point_threads()
    with gate if gate is not None else contextlib.nullcontext():
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise NotStarted(f"not started ({deadline_why})")
            if timeout_s is None or left < timeout_s:
                timeout_s, timeout_why = left, deadline_why
        if note:
            note(f"point {name}: starting ({recipe.method.key_params()}, {threads} CPU threads)")
        link_shared(recipe, sweep.root())
        t0 = time.perf_counter()
        rec = run_point_process(recipe, threads, timeout_s, name=name, log=log, timeout_why=timeout_why)
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        from .stages import write_json

        write_json(point_path(recipe), rec)
    return {**rec, "reused": False}


# ---- results ------------------------------------------------------------------------------

COLUMNS = ["point", "series", "key_params", "packed_bytes", "ratio", "top1", "drop", "on_front", "seconds", "version"]


def result_row(name: str, rec: dict, series: str | None = None) -> dict:
    s = rec["summary"]
    return {"point": name, "series": series or s["method"], "method": s["method"], "key_params": rec.get("key_params", ""), "packed_bytes": s["packed_bytes"],
            "ratio": s["compression_ratio"], "top1": s["compressed_top1"], "drop": s["top1_drop"],
            "seconds": rec.get("wall_s", rec["seconds"]["total"]), "packed_sha256": s["packed_sha256"],
            "test_images": s.get("test_images"), "metric": s.get("metric", "top1")}


def write_results(sweep: SweepConfig, rows: list[dict], teacher: dict, failed: dict[str, str], wall_s: float) -> dict:
    """sweep.json, front.md, front.csv, front.png in the sweep's folder; returns the record."""
    from .atomic import atomic_write
    from .report import markdown_table, metric_label, pareto_front, plot_front
    from .stages import write_json

    root = sweep.root()
    rows = pareto_front(rows)
    point_s = sum(r["seconds"] for r in rows if not r.get("reused"))  # computed in this run
    reused = sum(1 for r in rows if r.get("reused"))
    record = {"name": sweep.name, "teacher": teacher, "points": rows, "failed": failed, "wall_s": round(wall_s, 1),
              "sum_point_s": round(point_s, 1), "reused": reused, "concurrency": sweep.concurrency, "runner": sweep.runner}
    write_json(root / "sweep.json", record)
    top1, fp32 = teacher.get("top1"), teacher.get("fp32_bytes")
    metric = next((r["metric"] for r in rows if r.get("metric")), "top1")
    label = metric_label(metric)
    counts = sorted({r["test_images"] for r in rows if r.get("test_images")})
    where = f"the {' or '.join(f'{n:,}' for n in counts)} test {'texts' if metric == 'embedding_cosine' else 'images'}" \
        if counts else "the test set"
    head = (f"# Sweep {sweep.name}\n\nTeacher {teacher.get('arch')}: {label} "
            f"{'?' if top1 is None else f'{top1:.2f}'} %, {'?' if fp32 is None else f'{fp32:,}'} fp32 bytes. "
            f"{label[0].upper() + label[1:]} (column top1) on {where}, from each packed file; bytes = the file on disk.\n\n")
    foot = (f"\n\n{len(rows)} points ({reused} finished before, not recomputed), concurrency {sweep.concurrency}: "
            f"wall {wall_s:.0f} s for {point_s:.0f} s of point time." + (f" Failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}." if failed else ""))
    atomic_write(root / "front.md", [(head + markdown_table(rows, COLUMNS) + foot + "\n").encode()])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(root / "front.csv", [buf.getvalue().encode()])
    plot_front(rows, root / "front.png", teacher.get("top1"), f"{sweep.name}: {label} vs packed bytes", metric)
    return record


# ---- a sweep with the library alone ---------------------------------------------------------

LOCAL_COLUMNS = ["point", "series", "key_params", "packed_bytes", "ratio", "top1", "drop", "seconds"]


def run_local(sweep: SweepConfig, names: list[str] | None = None, threads: int | None = None,
              deadline_s: float | None = None, progress_s: float = 60,
              print_: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Run ``names`` (default: every point) of ``sweep`` with the library alone: no Prefect,
    no MLflow, no DVC, no registration and no front files; the same point folders and
    point.json files as ``modelpress sweep``, each point in its own process (:func:`sweep_point`),
    ``sweep.concurrency`` at a time, finished points not recomputed. Points still running
    ``deadline_s`` after the start, or ``point_timeout_h`` after their own, are killed, those
    not started by the deadline are not started;
    either is reported in ``failed``. Every point is checked before any work (ValueError).
    Returns ``{"teacher", "points": {name: record}, "failed": {name: why}}``."""
    from . import stages

    points = dict(sweep.expand())
    names = names or list(points)
    missing = [n for n in names if n not in points]
    if missing:
        raise ValueError(f"no such point in sweep {sweep.name}: {', '.join(missing)}")
    for name in names:
        try:
            stages.preflight(points[name])
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None

    with sweep.lock(wait=False):
        return _run_local(sweep, points, names, threads, deadline_s, progress_s, print_)


def _run_local(sweep: SweepConfig, points: dict[str, Recipe], names: list[str], threads: int | None,
               deadline_s: float | None, progress_s: float, print_: Callable[[str], None]) -> dict:
    from . import stages
    from .report import markdown_table

    t0 = time.perf_counter()
    shared = sweep.shared_recipe()
    stages.fetch(shared)
    stages.teacher(shared, stages.resolve_weights(shared.teacher.weights))  # a models:/ URI as a local file
    teacher = stages.read_json(stages.paths(shared)["teacher_info"]) or {}
    print_(f"teacher ready in {time.perf_counter() - t0:.0f} s: {teacher.get('top1')} %")

    end = t0 + deadline_s if deadline_s else None
    lock, results, failed = threading.Lock(), {}, {}

    def one(name: str) -> None:
        tail: deque[str] = deque(maxlen=30)
        shown = [0.0]

        def log(line: str) -> None:  # every line kept for a failure report, one every progress_s shown
            tail.append(line)
            if time.perf_counter() - shown[0] >= progress_s:
                shown[0] = time.perf_counter()
                with lock:
                    print_(f"[{name}] {line}")

        try:
            rec = sweep_point(sweep, name, points[name], sweep.point_timeout_h * 3600, log=log, threads=threads, deadline=end,
                              deadline_why="--deadline-s")
        except NotStarted as e:
            failed[name] = str(e)
            return
        except Exception as e:  # noqa: BLE001 - one failed point does not sink the others
            failed[name] = error_line(e)
            with lock:
                print_(f"{name}: FAILED {failed[name]}\n  " + "\n  ".join(tail))
            return
        reused = rec.pop("reused")
        results[name] = rec
        if reused:
            return
        s = rec["summary"]
        with lock:
            print_(f"{name}: {s['compressed_top1']:.2f} % at {s['packed_bytes']:,} bytes in {rec['wall_s']:.0f} s "
                   f"({', '.join(f'{k} {v:.0f}' for k, v in rec['seconds'].items())}) on {s['device']}")

    with ThreadPoolExecutor(sweep.concurrency) as pool:
        list(pool.map(one, names))
    rows = [result_row(n, results[n], sweep.series_of(n)) for n in names if n in results]
    print_("\n" + markdown_table(rows, LOCAL_COLUMNS))
    print_(f"\nwall {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}")
    return {"teacher": teacher, "points": {n: results[n] for n in names if n in results}, "failed": failed}


def base_recipe(params: str, sets: list[str], whole: bool = False) -> Recipe:
    """The sweep's base recipe as ``modelpress sweep`` reads it, so that both run the same points
    into the same folders: another file than ./params.yaml is merged onto it (``whole``: alone)."""
    return Recipe.from_yaml(params, sets, base=None if whole else "params.yaml")


def main(argv: list[str] | None = None) -> int:
    """``python -m modelpress.sweep``: :func:`run_local` from the command line; exit status 1
    when a point failed or was not started."""
    ap = argparse.ArgumentParser(prog="python -m modelpress.sweep",
                                 description="Run a sweep's points with the library alone: no Prefect, no MLflow, no DVC. "
                                             "The same point folders and point.json files as `modelpress sweep`, each point "
                                             "in its own process; finished points are not recomputed.")
    ap.add_argument("sweep")
    ap.add_argument("--params", default="params.yaml",
                    help="the base recipe: merged onto ./params.yaml as `modelpress sweep` does (--whole: alone)")
    ap.add_argument("--whole", action="store_true", help="read --params alone, not merged onto ./params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], help="override of the base recipe (KEY=VALUE)")
    ap.add_argument("--only", default="", help="comma-separated point names, in this order (default: all)")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per point (default: cores / concurrency)")
    ap.add_argument("--workdir", default=None, help="the sweep's folder (default: the sweep file's)")
    ap.add_argument("--deadline-s", type=float, default=None, help="kill points still running after this many seconds")
    ap.add_argument("--out", default=None, help="also write the results (JSON) here")
    ap.add_argument("--progress-s", type=float, default=60, help="show one log line of each point this often")
    args = ap.parse_args(argv)
    try:
        sweep = SweepConfig.from_yaml(args.sweep, base_recipe(args.params, args.set, args.whole))
        update = {k: v for k, v in (("concurrency", args.concurrency), ("workdir", args.workdir)) if v}
        sweep = sweep.model_copy(update=update)
        names = [n for n in args.only.split(",") if n]
        missing = [n for n in names if n not in dict(sweep.expand())]
        if missing:
            raise ValueError(f"no such point in {args.sweep}: {', '.join(missing)}")
        result = run_local(sweep, names, args.threads, args.deadline_s, args.progress_s)
    except (ValueError, FolderBusy) as e:  # a bad file, setting or point, a busy folder: one line
        msg = error_line(e)
        print(f"python -m modelpress.sweep: error: {msg}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    from modelpress.sweep import main as _main  # the module's own copy, not __main__'s

    sys.exit(_main())
