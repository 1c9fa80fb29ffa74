"""Run a sweep's points with the library alone: no Prefect, no MLflow, no DVC.

For a machine that has PyTorch and little else (a GPU box with no package index): the same
points, the same folders and point.json files as ``modelpress sweep``, each point in its own
process, ``--concurrency`` at a time. Finished points are not recomputed.

    python bench/sweep_local.py bench/sweeps/cifar-resnet56.yaml --params bench/params/cifar-resnet56-pq.yaml \\
        -S data.sources=[/tmp/cifar10] --workdir /tmp/r56 --concurrency 3 --only pq-227471B,pq-170603B
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelpress import stages  # noqa: E402
from modelpress.recipe import Recipe  # noqa: E402
from modelpress.report import markdown_table  # noqa: E402
from modelpress.sweep import SweepConfig, compute_point, finished_point, result_row  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], help="override of the base recipe (KEY=VALUE)")
    ap.add_argument("--only", default="", help="comma-separated point names, in this order (default: all)")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per point (default: cores / concurrency)")
    ap.add_argument("--workdir", default=None, help="the sweep's folder (default: the sweep file's)")
    ap.add_argument("--deadline-s", type=float, default=None, help="kill points still running after this many seconds")
    ap.add_argument("--out", default=None, help="also write the results (JSON) here")
    ap.add_argument("--progress-s", type=float, default=60, help="show one log line of each point this often")
    args = ap.parse_args()

    sweep = SweepConfig.from_yaml(args.sweep, Recipe.from_yaml(args.params, args.set))
    update = {k: v for k, v in (("concurrency", args.concurrency), ("workdir", args.workdir)) if v}
    sweep = sweep.model_copy(update=update)
    points = dict(sweep.expand())
    names = [n for n in args.only.split(",") if n] or list(points)
    missing = [n for n in names if n not in points]
    if missing:
        sys.exit(f"no such point in {args.sweep}: {', '.join(missing)}")
    for name in names:
        stages.preflight(points[name])

    t0 = time.perf_counter()
    shared = sweep.shared_recipe()
    stages.fetch(shared)
    stages.teacher(shared, shared.teacher.weights)
    teacher = stages.read_json(stages.paths(shared)["teacher_info"]) or {}
    print(f"teacher ready in {time.perf_counter() - t0:.0f} s: {teacher.get('top1')} %", flush=True)

    end = t0 + args.deadline_s if args.deadline_s else None
    lock, results, failed = threading.Lock(), {}, {}

    def one(name: str) -> None:
        recipe = points[name]
        done = finished_point(recipe)
        if done is not None:
            results[name] = done
            return
        left = None if end is None else end - time.perf_counter()
        if left is not None and left <= 0:
            failed[name] = "not started (deadline)"
            return
        tail: deque[str] = deque(maxlen=30)
        shown = [0.0]

        def log(line: str) -> None:  # every line kept for a failure report, one a minute shown
            tail.append(line)
            if time.perf_counter() - shown[0] >= args.progress_s:
                shown[0] = time.perf_counter()
                with lock:
                    print(f"[{name}] {line}", flush=True)

        try:
            rec = compute_point(sweep, name, recipe, left, log=log, threads=args.threads, timeout_why="--deadline-s")
        except Exception as e:  # noqa: BLE001 - one failed point does not sink the others
            failed[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            with lock:
                print(f"{name}: FAILED {failed[name]}\n  " + "\n  ".join(tail), flush=True)
            return
        results[name] = rec
        s = rec["summary"]
        with lock:
            print(f"{name}: {s['compressed_top1']:.2f} % at {s['packed_bytes']:,} bytes in {rec['wall_s']:.0f} s "
                  f"({', '.join(f'{k} {v:.0f}' for k, v in rec['seconds'].items())}) on {s['device']}", flush=True)

    with ThreadPoolExecutor(sweep.concurrency) as pool:
        list(pool.map(one, names))
    rows = [result_row(n, results[n], sweep.series_of(n)) for n in names if n in results]
    print("\n" + markdown_table(rows, ["point", "series", "key_params", "packed_bytes", "ratio", "top1", "drop", "seconds"]))
    print(f"\nwall {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"teacher": teacher, "points": {n: results[n] for n in names if n in results},
                                              "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
