"""Layer-by-layer product quantization of a whole model (the driver around kmeans.py).

For each Conv2d/Linear (and attention in-projection) in forward order: capture the layer's inputs from the *already
compressed* student on in-domain images (only their Gram matrix is kept), cluster the weight's
sub-vectors in that metric, swap in a PQLayer, then tune its codebook by distillation.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...pack.codebook import code_bits  # noqa: F401  (the one bits-per-code formula; re-exported)
from ...progress import Progress, log
from ...train import distill, reseed
from ...walk import check_patterns, is_attention, is_transposed_linear, matches, named_layers, set_module, weight_of
from .budget import plan_budget, pq_bytes
from .config import BlockSpec, PQConfig
from .kmeans import gram_kmeans, position_kmeans
from .layer import PQ_LAYERS, PQAttention, PQLayer, input_gram, make_pq, to_subvectors

LayerCallback = Callable[[str, nn.Module, dict], None]


def layer_spec(name: str, layer: nn.Module, cfg: PQConfig) -> BlockSpec | None:
    """The block size and k that apply to a layer, or None when it stays dense."""
    if matches(name, cfg.exclude):
        return None
    for pattern, spec in cfg.overrides.items():
        if matches(name, [pattern]):
            return spec
    if isinstance(layer, nn.Linear) or is_attention(layer) or is_transposed_linear(layer):
        return cfg.linear
    if layer.kernel_size == (1, 1):
        return cfg.pointwise
    row, width = layer.weight[0].numel(), layer.kernel_size[1]
    if row % cfg.conv.block_size and row % width == 0 and width <= 64:
        # another kernel size than the block was chosen for (a 7x7 stem, 4x4 or 16x16 patches): one kernel row per block
        return BlockSpec(block_size=width, k=cfg.conv.k)
    return cfg.conv


def plan(model: nn.Module, cfg: PQConfig, codebook_dtype: str = "f16") -> list[tuple[str, BlockSpec]]:
    """Layers to quantize, in order, with their settings. Validates names and block sizes."""
    check_patterns(model, cfg.exclude, "exclude", extended=True)
    check_patterns(model, list(cfg.overrides), "overrides", extended=True)
    out = []
    for name, layer in named_layers(model, extended=True):
        spec = layer_spec(name, layer, cfg)
        if spec is None:
            continue
        weight = weight_of(layer)
        if pq_bytes(weight.numel(), spec, spec.codebook or codebook_dtype) >= 2 * weight.numel():
            log.info("pq: %s stays dense (%d weights: a codebook would not make it smaller)", name, weight.numel())
            continue
        row = weight[0].numel()
        if row % spec.block_size:
            raise ValueError(
                f"layer {name}: block size {spec.block_size} does not divide its input size {row}; "
                f"set an override for {name!r} or exclude it"
            )
        out.append((name, spec))
    if not out:
        raise ValueError("no layer to quantize: every Conv2d/Linear/attention is excluded or too small")
    return out


def output_error(w: torch.Tensor, w_hat: torch.Tensor, g: torch.Tensor) -> float:
    """Relative layer-output error ||X(W - W_hat)||^2 / ||X W||^2 from the Gram matrix (d, d), or
    from one Gram per block position (P, d, d), ``w`` being the sub-vectors in row-major order."""
    w, w_hat, g = w.double(), w_hat.double(), g.double()
    r = w - w_hat
    if g.dim() == 3:
        r, w = (t.reshape(-1, g.shape[0], g.shape[1]) for t in (r, w))
        return float(torch.einsum("npd,pde,npe->", r, g, r) / torch.einsum("npd,pde,npe->", w, g, w).clamp_min(1e-30))
    return float(((r @ g) * r).sum() / ((w @ g) * w).sum().clamp_min(1e-30))


def quantize_layer(layer: nn.Module, spec: BlockSpec, g: torch.Tensor | None, cfg: PQConfig,
                   seed: int) -> tuple[PQLayer | PQAttention, dict]:
    """Cluster one layer's sub-vectors and return the PQ module that replaces it."""
    w = to_subvectors(weight_of(layer).detach().cpu(), spec.block_size)
    k = min(spec.k, w.shape[0])
    t0 = time.perf_counter()
    if g is not None and g.dim() == 3:  # one metric per block position
        codebook, codes, info = position_kmeans(weight_of(layer).detach().cpu(), k, g, iters=cfg.kmeans_iters, seed=seed)
    else:
        codebook, codes, info = gram_kmeans(
            w, k, g, iters=cfg.kmeans_iters, seed=seed, init=cfg.kmeans_init, repair_empty=cfg.repair_empty
        )
    stats = {
        "block_size": spec.block_size,
        "k": k,
        "subvectors": w.shape[0],
        "kmeans_s": time.perf_counter() - t0,
        "empty_repaired": info["empty_repaired"],
        "weight_rel_error": float((w - codebook[codes]).norm() / w.norm().clamp_min(1e-30)),
    }
    return make_pq(layer, codebook, codes, spec.block_size), stats


def quantize_pq(
    student: nn.Module,
    cfg: PQConfig,
    calibration: torch.Tensor,
    train_batches: DataLoader | None = None,
    teacher: nn.Module | None = None,
    on_layer: LayerCallback | None = None,
    codebook_dtype: str = "f16",
    loss: Any = "kl",
) -> tuple[nn.Module, list[dict]]:
    """Quantize ``student`` in place, layer by layer, and return it with per-layer stats.

    Layers that are already PQ modules are skipped, so passing a partially quantized student
    (a checkpoint) resumes the loop; the dense ``teacher`` is then required (the plan and the
    per-layer seeds come from it). Otherwise it defaults to a copy of the student as given.
    ``on_layer(name, student, stats)`` is called after each layer (e.g. to checkpoint).
    ``codebook_dtype``: how the packed file will store codebooks (f16, f32, i8, i6, ...), which sets
    what a byte budget buys. ``loss``: what each codebook's distillation minimises
    (modelpress.train.distill: ``kl`` on logits, ``cosine`` or ``mse``, or a function).
    """
    if teacher is None:
        if any(isinstance(m, PQ_LAYERS) for m in student.modules()):
            raise ValueError("resuming a partly quantized student needs the dense teacher (teacher=...)")
        teacher = copy.deepcopy(student)
    teacher.eval()
    if cfg.target_bytes is not None:
        cfg, _ = plan_budget(teacher, cfg, calibration, codebook_dtype=codebook_dtype)
    todo = plan(teacher, cfg, codebook_dtype)
    stats_all, prog = [], Progress("pq layers", len(todo), every_s=0, unit="layer")
    for index, (name, spec) in enumerate(todo):
        layer = student.get_submodule(name)
        if isinstance(layer, PQ_LAYERS):
            prog.update(layer=name, status="done before")
            continue
        per_position = cfg.metric == "position"
        g = input_gram(student, layer, calibration, spec.block_size, per_position=per_position) if cfg.activation_weighted else None
        g_eval = g if g is not None else input_gram(student, layer, calibration, spec.block_size)
        pq, stats = quantize_layer(layer, spec, g, cfg, seed=cfg.seed + index)
        w = to_subvectors(weight_of(layer).detach().cpu(), spec.block_size)
        stats["output_rel_error"] = output_error(w, pq.codebook.detach().cpu()[pq.codes.cpu()], g_eval)
        set_module(student, name, pq)
        if cfg.layer_finetune_epochs > 0 and train_batches is not None:
            reseed(train_batches, cfg.seed + index)  # same batches whether or not the loop was resumed
            distill(student, teacher, train_batches, [pq.codebook], cfg.layer_finetune_epochs, cfg.layer_finetune_lr,
                    temperature=cfg.temperature, stage=f"tune {name}", train_mode=False, loss=loss)
            stats["output_rel_error_tuned"] = output_error(w, pq.codebook.detach().cpu()[pq.codes.cpu()], g_eval)
        numel = weight_of(layer).numel()
        stats.update(layer=name, index=index, weights=numel, bytes=pq_bytes(numel, spec, spec.codebook or codebook_dtype))
        if spec.codebook:  # a byte budget's choice for this layer: the file stores its codebook so
            stats["codebook"] = spec.codebook
        stats_all.append(stats)
        prog.update(layer=name, k=stats["k"], out_err=stats["output_rel_error"], kmeans_s=stats["kmeans_s"])
        if on_layer:
            on_layer(name, student, stats)
    return student, stats_all
