"""CPU latency of a packed model vs its dense teacher, and the packed file's load time.

    python bench/latency_bench.py data/model.mpk data/teacher/teacher.mpk [--batch 256] [--repeats 50]

The packed model is rebuilt from its file alone (PQ weights decoded once into ordinary
layers), so a batch runs the same kernels as the dense teacher.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from modelpress.pack import load_packed


def timed_load(path: str, repeats: int = 5) -> tuple[torch.nn.Module, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model, _ = load_packed(path)
        times.append(time.perf_counter() - t0)
    return model, statistics.median(times)


@torch.no_grad()
def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(5):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed")
    ap.add_argument("teacher")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    packed, packed_load = timed_load(args.packed)
    dense, dense_load = timed_load(args.teacher)
    _, meta = load_packed(args.packed)
    x = torch.randn(args.batch, *meta["input"]["shape"])
    # Interleave the two measurements so machine noise hits both alike.
    t_packed, t_dense = [], []
    for _ in range(3):
        t_packed.append(latency(packed, x, args.repeats))
        t_dense.append(latency(dense, x, args.repeats))
    p, d = min(t_packed), min(t_dense)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<8} {'file bytes':>12} {'load ms':>9} {'batch ms':>9}")
    print(f"{'packed':<8} {os.path.getsize(args.packed):>12,} {packed_load * 1e3:>9.1f} {p * 1e3:>9.2f}")
    print(f"{'dense':<8} {os.path.getsize(args.teacher):>12,} {dense_load * 1e3:>9.1f} {d * 1e3:>9.2f}")
    print(f"packed / dense latency: {p / d:.3f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
