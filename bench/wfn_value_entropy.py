"""How low can Weight Fixing Networks' entropy go once the first iteration has chosen its values?

    python bench/wfn_value_entropy.py [--weights ../shared/data/cifar10-resnets/resnet20-12fca82f.th]

Fixes the first 30 % of the pretrained CIFAR-10 ResNet-20 exactly as WFN's first iteration does
(modelpress.methods.wfn.fix_to), then sends every free weight to a value already in use and prints
the entropy of the whole network that would result, with:

- beta = 0: the nearest value, what WFN's regularisation term pulls toward;
- beta > 0: the entropy-constrained assignment of scalar quantization, the value minimising
  (relative distance)^2 + beta * (its code length in bits, -log2 of its share of the fixed weights),
  which sends a weight to a more used value when it is nearly as close.

It also prints how far the free weights would move (relative to their magnitude), the damage a
retraining would have to absorb, and how evenly the values in use are used; then the same at
beta = 0 for larger zero thresholds (gamma_0: more weights pruned to 0). No training: seconds.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from modelpress.methods.wfn import WFNConfig, fix_to, fixable, value_stats
from modelpress.methods.wfn.retrain import layer_weight
from modelpress.models import build_model
from modelpress.stages.pipeline import load_weights

REPO = Path(__file__).resolve().parents[1]


def targets(w: np.ndarray, values: np.ndarray, bits: np.ndarray, beta: float, zero_distance: float) -> np.ndarray:
    """Index into ``values`` minimising ((w - v) / max(|w|, zero_distance))^2 + beta * bits."""
    best = np.empty(w.size, np.int64)
    for lo in range(0, w.size, 8192):
        part = w[lo:lo + 8192, None]
        cost = ((part - values[None, :]) / np.maximum(np.abs(part), zero_distance)) ** 2 + beta * bits[None, :]
        best[lo:lo + 8192] = cost.argmin(1)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO.parent / "shared/data/cifar10-resnets/resnet20-12fca82f.th"))
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.0075, 0.01, 0.015])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--zero-distances", type=float, nargs="+", default=[2 ** -6])
    args = ap.parse_args()
    teacher = build_model(args.arch, num_classes=10, in_channels=3)
    load_weights(teacher, Path(args.weights), None)
    print("| delta | gamma_0 | values in use | code length of the 10 most used non-zero values (bits) | beta | zeros | "
          "entropy, whole network (bits/weight) | free weights moved: mean / rms relative |")
    print("|---|---|---|---|---|---|---|---|")
    default = WFNConfig().zero_distance
    runs = [(d, default, b) for d in args.deltas for b in args.betas]
    runs += [(d, z, 0.0) for d in args.deltas for z in args.zero_distances]
    for delta, zero, group in _grouped(runs):
        cfg = WFNConfig(distance_allowed=delta, zero_distance=zero)
        model = copy.deepcopy(teacher)
        masks = {n: torch.zeros(layer.weight.shape, dtype=torch.bool) for n, layer in fixable(model)}
        fix_to(model, cfg, masks, 0.3)
        fixed = torch.cat([layer_weight(model, n).detach()[m] for n, m in masks.items()]).double().numpy()
        free = torch.cat([layer_weight(model, n).detach()[~m] for n, m in masks.items()]).double().numpy()
        # 0 is always a target (as in WFN's term), so it is counted once even before anything is pruned
        values, counts = np.unique(np.concatenate([fixed, [0.0]]), return_counts=True)
        bits = -np.log2(counts / counts.sum())
        nonzero = np.sort(bits[values != 0])[:10]
        used = f"{nonzero.min():.2f}-{nonzero.max():.2f}" if nonzero.size else "(only 0)"
        for beta in group:
            t = targets(free, values, bits, beta, cfg.zero_distance)
            everything = np.concatenate([fixed, values[t]])
            unique, entropy = value_stats(everything)
            rel = np.abs(free - values[t]) / np.maximum(np.abs(free), cfg.zero_distance)
            print(f"| {delta} | 2^{np.log2(zero):g} | {unique} | {used} | {beta:g} | "
                  f"{(everything == 0).mean():.1%} | {entropy:.2f} | {rel.mean():.3f} / {np.sqrt((rel ** 2).mean()):.3f} |")


def _grouped(runs: list[tuple[float, float, float]]) -> list[tuple[float, float, list[float]]]:
    """(delta, gamma_0, [betas]) in order of first appearance: one first iteration per pair."""
    out: dict[tuple[float, float], list[float]] = {}
    for d, z, b in runs:
        out.setdefault((d, z), []).append(b)
    return [(d, z, bs) for (d, z), bs in out.items()]


if __name__ == "__main__":
    main()
