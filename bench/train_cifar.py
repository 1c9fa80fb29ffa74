"""Train a CIFAR-10 teacher for the quality figures of bench/cifar_quality.py: the recipe.

    python bench/train_cifar.py --data ../shared/data/cifar10 --arch torchvision:mobilenet_v2 \
        --epochs 10 --optimizer sgd --lr 0.05 --weight-decay 4e-5 --out bench/out/mobilenet_v2-cifar10.pt
    python bench/train_cifar.py --data ../shared/data/cifar10 --arch cifar_vit \
        --arch-kwargs '{"num_layers": 6, "hidden_dim": 128, "mlp_dim": 256, "num_heads": 4}' \
        --epochs 10 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --out bench/out/vit-cifar10.pt

The project's one training loop (modelpress.train.fit): labels and cross-entropy with label
smoothing 0.1, the standard CIFAR augmentation (flip, 4-pixel shift) on every batch, batch 128,
linear warm-up over the first 5 % of steps then cosine decay. The checkpoint is a plain
state_dict (loads with ``weights_only=True``) next to a JSON of the architecture, its top-1 on the
10,000 test images and the wall time. Uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modelpress.data.datasets import load_cifar10
from modelpress.models import build_model
from modelpress.train import evaluate, fit, flip_and_crop, loader, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with cifar10-train.npz and cifar10-test.npz")
    ap.add_argument("--arch", required=True, help="a modelpress architecture name (cifar_vit, torchvision:mobilenet_v2, ...)")
    ap.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments of the architecture")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="checkpoint path (.pt); a .json beside it gets the figures")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    train, test = load_cifar10(args.data)
    kwargs = {"num_classes": 10, **json.loads(args.arch_kwargs)}
    model = build_model(args.arch, **kwargs).to(device)
    gen = torch.Generator().manual_seed(args.seed)

    def loss_fn(x, y):
        return F.cross_entropy(model(flip_and_crop(x, generator=gen)), y, label_smoothing=args.label_smoothing)

    t0 = time.time()
    fit(model, model.parameters(), loader(train, args.batch_size, shuffle=True, seed=args.seed), loss_fn, args.epochs,
        args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay, warmup_frac=0.05, device=device,
        on_epoch=lambda state: print(f"epoch boundary at step {state['step']}, {time.time() - t0:.0f} s", flush=True))
    wall = time.time() - t0
    top1 = evaluate(model, loader(test, 500, shuffle=False), device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out)
    info = {"arch": args.arch, "kwargs": kwargs, "top1": top1, "epochs": args.epochs, "optimizer": args.optimizer,
            "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
            "label_smoothing": args.label_smoothing, "seed": args.seed, "wall_s": round(wall), "device": str(device),
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters())}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
