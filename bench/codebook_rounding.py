"""What storing codebooks as B-bit integers costs a finished model, before any retraining.

    .venv/bin/python bench/codebook_rounding.py bench/out/sweeps/cifar-resnet20/points/<point>/finetune/finetuned.mpk \
        --data bench/out/sweeps/cifar-resnet20/datasets/cifar10 --dataset cifar10 --bits 8 6 5 4

Reads a packed file with f32 (or f16) codebooks, rounds every PQ codebook to the storage of
``pack.codebook_dtype: iB`` (one f16 scale per column) and prints the top-1 on the full test set,
with nothing re-estimated. ``--per-codebook`` uses one scale per codebook instead.
"""

from __future__ import annotations

import argparse
import copy

import torch

from modelpress.data.datasets import load_dataset
from modelpress.methods.pq.layer import PQLayer
from modelpress.pack.format import build_from_packed, read_packed, round_codebook
from modelpress.train import evaluate, loader


def rounded(model: torch.nn.Module, bits: int, per_codebook: bool) -> torch.nn.Module:
    out = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, PQLayer):
                if per_codebook:
                    s = m.codebook.abs().max() / qmax
                    m.codebook.copy_((m.codebook / s).round().clamp(-qmax, qmax) * s)
                else:
                    m.codebook.copy_(round_codebook(m.codebook, f"i{bits}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed")
    ap.add_argument("--data", required=True, help="folder of the dataset's files")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4])
    ap.add_argument("--per-codebook", action="store_true")
    args = ap.parse_args()
    _, test = load_dataset(args.dataset, args.data)
    model = build_from_packed(read_packed(args.packed), materialize=False).eval()
    batches = loader(test, 1000, False)
    print(f"as stored: {evaluate(model, batches):.2f} %")
    for bits in args.bits:
        print(f"i{bits}{' (one scale per codebook)' if args.per_codebook else ''}: "
              f"{evaluate(rounded(model, bits, args.per_codebook), batches):.2f} %")


if __name__ == "__main__":
    main()
