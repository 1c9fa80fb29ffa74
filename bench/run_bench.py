"""Time a whole `modelpress run`, stage by stage, and print the summary.

    python bench/run_bench.py                       # the default params.yaml, fresh workdir
    python bench/run_bench.py -S method.linear.k=128
    python bench/run_bench.py --params bench/params/cifar-resnet20-wfn.yaml --keep /tmp/wfn   # keep the outputs

Runs the real command in a fresh process with a fresh work directory (so the teacher is
trained, nothing is cached) and a throw-away MLflow store, then prints seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(params: str | Path, overrides: list[str], work: Path, env: dict) -> tuple[dict, dict, float]:
    """``modelpress run --params PARAMS -S ...`` in a fresh process: (seconds per stage, metrics.json
    of ``work``, wall seconds of the whole command). Exits with the run's error if it fails."""
    cmd = [sys.executable, "-m", "modelpress", "run", "--params", str(params)]
    for s in overrides:
        cmd += ["-S", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # `kill` of the benchmark stops the run too (which stops its own processes), not an orphan that
    # goes on computing. (Ctrl-C reaches the whole process group, the run included, by itself.)
    signal.signal(signal.SIGTERM, lambda s, _frame: proc.send_signal(s))
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"run failed:\n{stderr[-3000:]}")
    return json.loads((work / "run_timings.json").read_text()), json.loads((work / "metrics.json").read_text()), wall


def print_timings(timings: dict, wall: float) -> None:
    """The stages' seconds in pipeline order, then the whole command's."""
    print(f"{'stage':<10} {'seconds':>8}")
    order = ["fetch", "teacher", "compress", "finetune", "pack", "evaluate", "register", "total"]
    for stage in sorted(timings, key=lambda k: order.index(k) if k in order else len(order)):
        print(f"{stage:<10} {timings[stage]:>8.1f}")
    print(f"{'wall':<10} {wall:>8.1f}   (whole command: imports, Prefect's temporary server, all stages)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="work directory to keep (it must not exist): the packed file, metrics.json, the step records")
    args = ap.parse_args()
    if args.keep and Path(args.keep).exists():
        sys.exit(f"--keep {args.keep}: already exists (the run must start from nothing)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp) / "data"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": f"{tmp}/prefect"}
        timings, metrics, wall = run(args.params, [f"run.workdir={work}", *args.set], work, env)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {cpu}; python {platform.python_version()}")
    print_timings(timings, wall)
    print(f"teacher top-1 {metrics['teacher_top1']:.2f}%  packed top-1 {metrics['compressed_top1']:.2f}%  "
          f"drop {metrics['top1_drop']:.2f} points  {metrics['packed_bytes']:,} bytes  "
          f"{metrics['compression_ratio']:.1f}x smaller than {metrics['teacher_fp32_bytes']:,} fp32 bytes")


if __name__ == "__main__":
    main()
