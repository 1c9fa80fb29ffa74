"""LC points on a pretrained CIFAR-10 ResNet with the library alone (no Prefect, MLflow or DVC):
LC steps, then distillation of what stays trainable (codebooks, low-rank factors, survivors,
biases, BatchNorm), BatchNorm re-estimation, packing, and top-1 of the model *as loaded from the
packed file* on the 10,000 test images. Prints one row per point and writes them as JSON.

    python bench/lc_cifar.py --data ../shared/data/cifar10 \
        --weights ../shared/data/cifar10-resnets/resnet20-12fca82f.th --arch cifar_resnet20 \
        --points binary,ternary --out /tmp/lc.json

A point is a name from POINTS below (or several, comma-separated). Uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelpress.data import load_dataset  # noqa: E402
from modelpress.flops import layer_macs  # noqa: E402
from modelpress.methods.lc import METHOD, LCConfig, lc_compress  # noqa: E402
from modelpress.methods.prune import keep_masks  # noqa: E402
from modelpress.models import build_model  # noqa: E402
from modelpress.pack import load_packed, pack_model  # noqa: E402
from modelpress.stages.pipeline import load_weights  # noqa: E402
from modelpress.train import distill, evaluate, loader, recalibrate_batchnorm, resolve_device  # noqa: E402

ALL = ["*"]
POINTS: dict[str, dict] = {
    "binary": {"tasks": [{"layers": ALL, "scheme": "binary"}]},
    "k2": {"tasks": [{"layers": ALL, "scheme": "quantize", "k": 2}]},
    "ternary": {"tasks": [{"layers": ALL, "scheme": "ternary"}]},
    # one scale per output channel (affine entries) instead of one per layer
    "binary-pc": {"tasks": [{"layers": ALL, "scheme": "binary", "per_channel": True}]},
    "ternary-pc": {"tasks": [{"layers": ALL, "scheme": "ternary", "per_channel": True}]},
    # at most 42 % non-zero codes per layer: about 1.40 bits per weight, the 20x point's bytes (<= 54,000)
    "ternary-nz42": {"tasks": [{"layers": ALL, "scheme": "ternary", "nonzero": 0.42}]},
    "prune90": {"tasks": [{"layers": ALL, "scheme": "prune", "keep": 0.1}]},
    "lowrank-half": {"tasks": [{"layers": ["layer2.*"], "scheme": "lowrank", "rank": 16},
                               {"layers": ["layer3.*"], "scheme": "lowrank", "rank": 32}]},
    "lowrank": {"tasks": [{"layers": ["layer*"], "scheme": "lowrank", "alpha": 1e-7, "cost": "flops"}]},
    "lowrank3-ternary": {"tasks": [{"layers": ["layer3.*"], "scheme": "lowrank", "rank": 16},
                                   {"layers": ["conv1", "layer1.*", "layer2.*", "linear"], "scheme": "ternary"}]},
    # additive: every weight ternary plus a sparse correction of the 0.5 % largest residuals (network-wide)
    "ternary-sparse": {"tasks": [{"layers": ALL, "scheme": "ternary", "additive": True},
                                 {"layers": ALL, "scheme": "prune", "keep": 0.005, "additive": True}]},
    "prune92": {"tasks": [{"layers": ALL, "scheme": "prune", "keep": 0.075}]},  # the bytes of ternary-sparse
}


def trainable(model: nn.Module, cfg: LCConfig) -> list[nn.Parameter]:
    """What the fine-tuning trains: the method's (codebooks, factors, survivors) plus every
    bias and BatchNorm parameter."""
    params = METHOD.trainable(model, cfg)
    seen = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in seen and (p.dim() == 1 or name.endswith(".bias")):
            params.append(p)
            seen.add(id(p))
    return params


def run_point(name: str, args, train, test, teacher: nn.Module, device: torch.device) -> dict:
    tasks = [dict(t, alpha=args.alpha) if args.alpha is not None and "alpha" in t else t for t in POINTS[name]["tasks"]]
    raw = {**POINTS[name], "tasks": tasks, "lc_steps": args.lc_steps, "l_step_epochs": args.l_epochs, "mu0": args.mu0,
           "mu_growth": args.mu_growth, "lr": args.lr, "lr_decay": args.lr_decay, "batch_size": args.batch_size}
    cfg = LCConfig(**raw)
    t0 = time.perf_counter()
    batches = loader(train, args.batch_size, True, 0)
    model, records = lc_compress(copy.deepcopy(teacher), cfg, batches, teacher, device)
    t_lc = time.perf_counter() - t0
    lc_top1 = evaluate(model, loader(test, 1000, False), device)
    if args.finetune_epochs > 0:
        with keep_masks(model, METHOD.held_zero(model, cfg)):  # pruned weights stay zero
            distill(model, teacher, loader(train, args.batch_size, True, 1), trainable(model, cfg), args.finetune_epochs,
                    args.finetune_lr, temperature=args.temperature, stage="finetune", device=device, augment=True)
    recalibrate_batchnorm(model, loader(train, 500, True, 2), 100)
    path = Path(args.workdir) / f"lc-{name}.mpk"
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = {"name": args.arch, "kwargs": {}}
    nbytes = pack_model(model.cpu(), path, arch, {"lc": name})
    loaded, _ = load_packed(path)
    top1 = evaluate(loaded.to(device), loader(test, 1000, False), device)
    example = next(iter(loader(test, 1, False)))[0]
    macs = sum(layer_macs(load_packed(path, materialize=False)[0], example).values())
    row = {"point": name, "bytes": nbytes, "file_bytes": path.stat().st_size, "top1": top1, "top1_after_lc": lc_top1,
           "macs": macs, "lc_seconds": round(t_lc, 1), "seconds": round(time.perf_counter() - t0, 1),
           "last_relative_distance": records[-1]["relative_distance"], "device": str(device),
           "ranks": {n: int(m.rank) for n, m in model.named_modules() if isinstance(getattr(m, "rank", None), int)} or None,
           "settings": {k: v for k, v in raw.items() if k != "tasks"}, "tasks": raw["tasks"],
           "finetune": {"epochs": args.finetune_epochs, "lr": args.finetune_lr, "temperature": args.temperature}}
    print(f"{name:>18}  {nbytes:>9,d} B  top-1 {top1:6.2f} %  (after LC {lc_top1:6.2f} %)  "
          f"MACs {macs / 1e6:6.2f} M  {row['seconds']:7.1f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with cifar10-train.npz and cifar10-test.npz")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--points", default="binary")
    ap.add_argument("--lc-steps", type=int, default=30)
    ap.add_argument("--l-epochs", type=float, default=1.0)
    ap.add_argument("--mu0", type=float, default=1e-3)
    ap.add_argument("--mu-growth", type=float, default=1.3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lr-decay", type=float, default=0.95)
    ap.add_argument("--alpha", type=float, default=None,
                    help="rank selection's weight of the cost (points with alpha): larger, lower ranks")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--finetune-epochs", type=float, default=4.0)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=4.0, help="of the fine-tuning's distillation")
    ap.add_argument("--workdir", default="/tmp/lc-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the library's progress lines (modelpress.progress)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    train, test = load_dataset("cifar10", args.data)
    teacher = build_model(args.arch)
    load_weights(teacher, Path(args.weights), None)
    teacher = teacher.to(device).eval()
    base = evaluate(teacher, loader(test, 1000, False), device)
    print(f"teacher {args.arch}: top-1 {base:.2f} % on {len(test)} test images; {len(train)} training images; {device}",
          flush=True)
    rows = []
    for name in args.points.split(","):
        rows.append(run_point(name, args, train, test, teacher, device))
        if args.out:
            Path(args.out).write_text(json.dumps({"teacher_top1": base, "train_images": len(train), "points": rows}, indent=1))


if __name__ == "__main__":
    main()
