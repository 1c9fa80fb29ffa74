"""Time modelpress's activation-weighted k-means (Gram form) per layer, and the naive form.

    python bench/kmeans_bench.py [--iters 30] [--calib 256] [--threads N] [--naive-budget 30]

(a) the reference case: a 64->64 3x3 conv (4,096 sub-vectors of 9), k=256, G from
    1,000 activation rows; plus the naive form (materialise X (W - c) for every centroid) for one
    assignment step, timed on as many centroids as fit in --naive-budget s and extrapolated to k.
(b) every Conv2d/Linear of fmnist_cnn and cifar_resnet20 with modelpress's default PQ settings.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import modelpress.methods.pq.kmeans as kmeans
from modelpress.methods.pq import PQConfig
from modelpress.methods.pq.layer import to_subvectors
from modelpress.methods.pq.quantize import input_gram, layer_spec, plan
from modelpress.models import build_model
from modelpress.walk import named_layers


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def timed_kmeans(w: torch.Tensor, k: int, g: torch.Tensor, iters: int) -> tuple[float, int]:
    """Wall time of gram_kmeans and the Lloyd iterations it ran (it stops early once stable)."""
    calls, real_assign = [0], kmeans.assign

    def counting(*a):
        calls[0] += 1
        return real_assign(*a)

    kmeans.assign = counting
    try:
        t0 = time.perf_counter()
        kmeans.gram_kmeans(w, k, g, iters=iters, seed=0)
        return time.perf_counter() - t0, max(0, calls[0] - 1)  # first call is the initial assignment
    finally:
        kmeans.assign = real_assign


def step_time(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor, repeat: int = 10) -> float:
    """One Lloyd iteration the Gram way: (n x k) assignment plus the mean update."""
    w, c, g = w.double(), c.double(), g.double()
    t0 = time.perf_counter()
    for _ in range(repeat):
        codes = kmeans.assign(w, c, g)
        sums = torch.zeros_like(c).index_add_(0, codes, w)
        _ = sums / torch.bincount(codes, minlength=len(c)).clamp_min(1).unsqueeze(1)
    return (time.perf_counter() - t0) / repeat


def naive_assign_time(w: torch.Tensor, c: torch.Tensor, x: torch.Tensor, budget_s: float) -> tuple[float, int, float]:
    """Distances ||X (w_j - c)||^2 by materialising X (W - c)^T for each centroid (the reference
    implementation's way). Returns (extrapolated seconds for all k, centroids timed, max rel diff)."""
    w, c, x, g = w.double(), c.double(), x.double(), (x.T @ x).double()
    t0, done, worst = time.perf_counter(), 0, 0.0
    while done < len(c) and (done < 2 or time.perf_counter() - t0 < budget_s):
        d_naive = (x @ (w - c[done]).T).pow(2).sum(0)  # (rows, n) materialised, summed over rows
        done += 1
        r = w - c[done - 1]
        d_gram = ((r @ g) * r).sum(1)
        worst = max(worst, float(((d_naive - d_gram).abs() / d_gram.clamp_min(1e-30)).max()))
    elapsed = time.perf_counter() - t0
    return elapsed * len(c) / done, done, worst


def reference_case(args) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    w = to_subvectors(conv.weight.detach(), 9)  # (4096, 9)
    x = torch.relu(torch.randn(args.rows, 9, generator=gen))  # random post-ReLU activation rows
    t0 = time.perf_counter()
    g = x.double().T @ x.double()
    gram_s = time.perf_counter() - t0
    total, ran = timed_kmeans(w, 256, g, args.iters)
    c = w[torch.randperm(len(w), generator=gen)[:256]]
    per_iter = step_time(w, c, g)
    print(f"(a) reference: 64->64 3x3 conv, {len(w)} sub-vectors of 9, k=256, G from {args.rows} random post-ReLU activation rows")
    print(f"    Gram G = X^T X              {gram_s * 1e3:10.2f} ms")
    print(f"    Gram form, one iteration    {per_iter * 1e3:10.2f} ms  (assignment + mean update)")
    print(f"    Gram form, {args.iters} iterations    {per_iter * args.iters:10.3f} s   (fixed {args.iters} x one iteration)")
    print(f"    gram_kmeans(iters={args.iters})     {total:10.3f} s   (k-means++ seeding included; ran {ran} iterations, stops when stable)")
    naive, done, worst = naive_assign_time(w, c, x, args.naive_budget)
    how = "measured" if done == len(c) else f"timed on {done} of 256 centroids, extrapolated"
    print(f"    naive form, one assignment  {naive:10.3f} s   ({how}; max rel. diff to Gram distances {worst:.1e})")
    print(f"    speed-up of the Gram form, one iteration: {naive / per_iter:,.0f}x")
    print(f"    naive form, {args.iters} iterations (extrapolated): {naive * args.iters:,.1f} s")


def model_table(args) -> None:
    cfg = PQConfig()
    print(f"\n(b) every layer with default PQ settings (conv 3x3 block 9, 1x1 block 4, linear block 8, k=min(256, n)),"
          f" {args.iters} iterations max, G from {args.calib} random images, untrained weights")
    print(f"{'model':<15}{'layer':<24}{'weight':>18}{'blk':>4}{'n':>8}{'k':>5}{'gram_s':>8}{'kmeans_s':>9}{'iters':>6}{'ms/iter':>9}")
    for arch, shape in (("fmnist_cnn", (1, 28, 28)), ("cifar_resnet20", (3, 32, 32))):
        torch.manual_seed(0)
        model = build_model(arch).eval()
        images = torch.randn(args.calib, *shape)
        planned = dict(plan(model, cfg))
        sums = [0.0, 0.0]
        for name, layer in named_layers(model):
            weight = "x".join(map(str, layer.weight.shape))
            if name not in planned:
                why = "excluded" if layer_spec(name, layer, cfg) is None else "stays dense (too small)"
                print(f"{arch:<15}{name:<24}{weight:>18}  {why}")
                continue
            spec = planned[name]
            t0 = time.perf_counter()
            g = input_gram(model, layer, images, spec.block_size)
            gram_s = time.perf_counter() - t0
            w = to_subvectors(layer.weight.detach(), spec.block_size)
            k = min(spec.k, len(w))
            total, ran = timed_kmeans(w, k, g, args.iters)
            per_iter = step_time(w, w[:k], g, repeat=3)
            sums[0] += gram_s
            sums[1] += total
            print(f"{arch:<15}{name:<24}{weight:>18}{spec.block_size:>4}{len(w):>8}{k:>5}{gram_s:>8.3f}{total:>9.3f}{ran:>6}{per_iter * 1e3:>9.2f}")
        print(f"{arch:<15}{'total':<24}{'':>18}{'':>4}{'':>8}{'':>5}{sums[0]:>8.3f}{sums[1]:>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30, help="Lloyd iterations (modelpress default: 30)")
    ap.add_argument("--rows", type=int, default=1000, help="activation rows behind G in the reference case")
    ap.add_argument("--calib", type=int, default=256, help="images whose activations define G in (b)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--naive-budget", type=float, default=30.0, help="seconds to spend timing the naive form")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}")
    reference_case(args)
    model_table(args)


if __name__ == "__main__":
    main()
