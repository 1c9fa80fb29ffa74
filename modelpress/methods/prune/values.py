"""Pruning followed by quantization: each pruned layer's surviving weights are clustered into
a small per-layer codebook (sub-vectors of ``block_size`` consecutive survivors, row-major),
then all codebooks are tuned together by distillation from the teacher."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...train import distill, reseed
from ...walk import set_module
from ..pq.kmeans import gram_kmeans
from ..pq.layer import PQLayer
from .config import ValueQuantConfig
from .magnitude import prunable


def quantize_survivors(model: nn.Module, cfg: ValueQuantConfig, exclude: list[str] = ()) -> list[dict]:
    """Replace each pruned layer by a sparse PQLayer over its kept weights. Returns stats."""
    stats = []
    for index, (name, layer) in enumerate(prunable(model, exclude)):
        w = layer.weight.detach().cpu()
        mask = w != 0
        kept = w[mask]
        if kept.numel() == 0:
            continue
        d = cfg.block_size
        pad = (-kept.numel()) % d
        vectors = torch.cat([kept, kept.new_zeros(pad)]).reshape(-1, d)
        k = min(cfg.k, vectors.shape[0])
        t0 = time.perf_counter()
        codebook, codes, _ = gram_kmeans(vectors, k, None, iters=cfg.kmeans_iters, seed=cfg.seed + index)
        set_module(model, name, PQLayer(layer, codebook, codes, d, mask=mask.to(layer.weight.device)))
        stats.append({
            "layer": name, "index": index, "weights": w.numel(), "kept": int(mask.sum()), "block_size": d, "k": k,
            "kmeans_s": time.perf_counter() - t0,
            "weight_rel_error": float((vectors - codebook[codes]).norm() / vectors.norm().clamp_min(1e-30)),
        })
    return stats


def tune_codebooks(
    model: nn.Module, teacher: nn.Module, batches: DataLoader, epochs: float, lr: float, seed: int = 0,
    device: torch.device | None = None,
) -> None:
    """Distil every codebook (and nothing else) from the teacher."""
    if epochs <= 0:
        return
    reseed(batches, seed)
    torch.manual_seed(seed)
    codebooks = [m.codebook for m in model.modules() if isinstance(m, PQLayer)]
    distill(model, teacher, batches, codebooks, epochs, lr, stage="tune codebooks", device=device)
