"""Torchvision architectures through product quantization: compress, pack, then load the file in
a fresh process and compare outputs.

    python bench/any_model.py                                  # resnet18, mobilenet_v2, vit_b_16, hf-bert
    python bench/any_model.py --models vit_b_16 --kmeans-iters 5

Random weights (the mechanics, not accuracy): 32x32 images for the torchvision models; for
``hf-bert`` a 4-layer BERT-style encoder built offline from a configuration (transformers'
BertModel, hidden 256), fed padded token batches (input_ids, attention_mask). For each model: the
weight matrices it has (Conv2d, Linear, attention in-projections), how many the plan quantizes,
the PQ time, the packed file's bytes against fp32, and whether the module `load_packed` rebuilds
in a fresh Python process (from the file alone: architecture by torchvision builder name, or the
Hugging Face class and its configuration) gives the compressed module's outputs exactly
(torch.equal on the same inputs).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from modelpress.inputs import call, take
from modelpress.methods.pq import BlockSpec, PQConfig, plan, quantize_pq
from modelpress.models import build_model
from modelpress.pack import arch_spec, pack_model
from modelpress.train import output_tensor
from modelpress.walk import named_layers

KWARGS = {"vit_b_16": {"image_size": 32}}

FRESH = """
import sys, torch
from modelpress.inputs import call
from modelpress.pack import load_packed
from modelpress.train import output_tensor
model, _ = load_packed(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(output_tensor(call(model, x)), sys.argv[3])
"""


def _model(name: str, images: int) -> tuple[nn.Module, dict, object]:
    """(model, arch, calibration inputs)."""
    if name == "hf-bert":
        import transformers

        from modelpress.models.hf import hf_arch

        config = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=1024)
        model = transformers.BertModel(config).eval()
        ids = torch.randint(1, 30522, (images, 32))
        mask = (torch.arange(32)[None, :] < torch.randint(8, 33, (images, 1))).long()
        return model, hf_arch(model), {"input_ids": ids * mask, "attention_mask": mask}
    kwargs = {"num_classes": 10, **KWARGS.get(name, {})}
    model = build_model(f"torchvision:{name}", **kwargs).eval()
    return model, arch_spec(f"torchvision:{name}", **kwargs), torch.randn(images, 3, 32, 32)


def run(name: str, args, tmp: Path) -> dict:
    torch.manual_seed(0)
    model, arch, images = _model(name, args.images)
    matrices = [n for n, _ in named_layers(model, attention=True)]
    # 3x3 kernels: one kernel per block; other kernel sizes (a 7x7 stem, 16x16 patches): a row of the kernel
    odd = {n: BlockSpec(block_size=m.kernel_size[1], k=args.k) for n, m in model.named_modules()
           if isinstance(m, nn.Conv2d) and m.kernel_size not in ((1, 1), (3, 3))}
    cfg = PQConfig(kmeans_iters=args.kmeans_iters, layer_finetune_epochs=0, calibration_images=args.images,
                   conv=BlockSpec(block_size=9, k=args.k), pointwise=BlockSpec(block_size=4, k=args.k),
                   linear=BlockSpec(block_size=4, k=args.k), overrides=odd)
    planned = [n for n, _ in plan(model, cfg)]
    t0 = time.perf_counter()
    student, _ = quantize_pq(copy.deepcopy(model), cfg, images, teacher=model)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # the file stores floats and codebooks as f16: the module holds those values
        for t in [*student.parameters(), *student.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())
    path = tmp / f"{name}.mpk"
    size = pack_model(student, path, arch)
    x = take(images, 0, 8)
    torch.save(x, tmp / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(path), str(tmp / "x.pt"), str(tmp / "y.pt")], check=True)
    with torch.no_grad():
        exact = torch.equal(torch.load(tmp / "y.pt", weights_only=True), output_tensor(call(student.eval(), x)))
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    attention = sum(isinstance(model.get_submodule(n), nn.MultiheadAttention) for n in planned)
    return {"model": name, "matrices": len(matrices), "planned": len(planned), "attention": attention,
            "dense": sorted(set(matrices) - set(planned)), "pq_s": seconds, "bytes": size, "fp32": fp32, "exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "vit_b_16", "hf-bert"])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--kmeans-iters", type=int, default=3)
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(run(name, args, Path(tmp)))
            print(rows[-1], flush=True)
    print("\n| model | weight matrices | quantized (attention in-projections) | left dense | PQ time | packed bytes | fp32 bytes | ratio | fresh-process outputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['matrices']} | {r['planned']} ({r['attention']}) | {', '.join(r['dense']) or 'none'} "
              f"| {r['pq_s']:.0f} s | {r['bytes']:,} | {r['fp32']:,} | {r['fp32'] / r['bytes']:.1f}x "
              f"| {'identical' if r['exact'] else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
