"""Weight Fixing Networks as a method of the pipeline (the contract: modelpress/methods/base.py).

One step = one fixing iteration: fix (network-wide) the share ``fractions[index]`` of all
Conv2d/Linear weights onto the candidate values, then retrain the weights still free (the last
iteration fixes everything and retrains nothing). Which weights are fixed travels from step to
step in the record's ``state`` (per layer, the packed bits of the mask); their values are the
model's own weights, which the pipeline checkpoints exactly (f32). ``finish`` turns each layer
into a PQLayer with a k x 1 codebook of the layer's values and one code per weight: the packed
file range-codes the codes, so its size follows the weights' entropy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...pack.codebook import is_int_codebook
from ...pack.entries import encode_pq
from ...progress import log
from ...walk import check_patterns, matches, named_layers, set_module
from ..base import Context, Method, Steps, batch_size_of_teacher, run_steps
from ..pq import PQLayer
from .config import WFNConfig
from .retrain import layer_weight, retrain
from .values import candidate_levels, choose, decode_mask, encode_mask, value_stats


def fixable(model: nn.Module, exclude: list[str] | tuple[str, ...] = ()) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """Every Conv2d/Linear whose weight is fixed (biases and BatchNorm never are; grouped and
    depthwise convolutions are). Raises ValueError for an exclusion that names no layer, or
    nothing left to fix."""
    check_patterns(model, list(exclude), "exclude")
    layers = [(n, m) for n, m in named_layers(model) if not matches(n, list(exclude)) and isinstance(m.weight, nn.Parameter)]
    if not layers:
        raise ValueError(f"wfn: no layer to fix in {type(model).__name__}: it has no Conv2d/Linear weight outside the exclusions")
    return layers


def check(model: nn.Module, cfg: WFNConfig, ctx: Context) -> None:
    """Fails in seconds, before any data or teacher: exclusions, layers, codebook storage.
    (distance_allowed, fractions, zero_distance are checked by the config itself.)"""
    fixable(model, cfg.exclude)
    if is_int_codebook(ctx.codebook_dtype):
        raise ValueError(f"wfn: pack.codebook_dtype {ctx.codebook_dtype} would move the fixed values (integer codebooks "
                         f"are scaled per layer); use f16 (every candidate value is exact in it) or f32")


def fixed_masks(model: nn.Module, cfg: WFNConfig, ctx: Context, index: int) -> dict[str, torch.Tensor]:
    """Which weights earlier iterations fixed: from the previous step's record (none at step 0)."""
    layers = fixable(model, cfg.exclude)
    if index == 0:
        return {n: torch.zeros(m.weight.shape, dtype=torch.bool) for n, m in layers}
    state = (ctx.previous or {}).get("state")
    if not state or "fixed" not in state:
        raise ValueError(f"wfn: iteration {index + 1} needs the record of iteration {index} (ctx.previous['state'])")
    missing = [n for n, _ in layers if n not in state["fixed"]]
    if missing:
        raise ValueError(f"wfn: the previous iteration's state has no mask for {', '.join(missing)} (other exclusions?)")
    return {n: decode_mask(state["fixed"][n], tuple(m.weight.shape)) for n, m in layers}


def _fixed_values(model: nn.Module, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([layer_weight(model, n).detach().cpu()[mask] for n, mask in masks.items()])


def identity(cfg: WFNConfig, index: int, _ctx: Context) -> list | None:
    """Iteration ``index`` depends on the settings and the schedule up to it: a run with a
    longer (or finer at the end) schedule reuses the iterations they share."""
    if index >= len(cfg.fractions):
        return None
    return [cfg.model_dump(mode="json", exclude={"fractions"}), cfg.fractions[: index + 1]]


def count(cfg: WFNConfig) -> int:
    return len(cfg.fractions)


def prepare(model: nn.Module, cfg: WFNConfig, _ctx: Context) -> None:
    fixable(model, cfg.exclude)


@torch.no_grad()
def fix_to(model: nn.Module, cfg: WFNConfig, masks: dict[str, torch.Tensor], fraction: float) -> dict:
    """Fix more weights, network-wide, until ``fraction`` of them are fixed (the rule:
    values.choose). Updates ``masks`` and the weights in place; returns what it did."""
    names = list(masks)
    weights = [layer_weight(model, n) for n in names]
    flat = torch.cat([w.detach().reshape(-1).cpu().double() for w in weights]).numpy()
    fixed = torch.cat([masks[n].reshape(-1) for n in names]).numpy()
    total = flat.size
    goal = total if fraction >= 1.0 else int(round(fraction * total))
    needed = max(0, goal - int(fixed.sum()))
    free = np.flatnonzero(~fixed)
    levels = candidate_levels(cfg.max_order, cfg.zero_distance, float(np.abs(flat).max()))
    idx, values, info = choose(flat[free], needed, levels, cfg.distance_allowed, cfg.zero_distance, cfg.distance_rule)
    pos = free[idx]
    flat[pos] = values
    fixed[pos] = True
    start = 0
    for n, w in zip(names, weights):
        k = w.numel()
        w.copy_(torch.from_numpy(flat[start:start + k]).reshape(w.shape).to(w.device, w.dtype))
        masks[n] = torch.from_numpy(fixed[start:start + k].copy()).reshape(w.shape)
        start += k
    return {"newly_fixed": int(pos.size), "candidates": int(levels[-1].size), **info}


def run_iteration(model: nn.Module, cfg: WFNConfig, index: int, ctx: Context) -> dict | None:
    """Iteration ``index``: fix up to ``fractions[index]``, then retrain the free weights
    (except after the last iteration, which fixes them all). The record's ``unique_values`` and
    ``entropy_bits`` are those of the fixed weights, network-wide (after the last iteration: of
    every weight); ``beyond_delta`` counts the weights fixed further than delta this time."""
    if index >= len(cfg.fractions):
        return None
    t0 = time.perf_counter()
    masks = fixed_masks(model, cfg, ctx, index)
    fraction = cfg.fractions[index]
    done = index == len(cfg.fractions) - 1
    info = fix_to(model, cfg, masks, fraction)
    values = _fixed_values(model, masks)
    used = np.unique(values.double().numpy())
    losses: list[float] = []
    if not done and cfg.epochs_per_iteration > 0:
        used_with_zero = np.union1d(used, [0.0])
        losses = retrain(model, cfg, masks, used_with_zero, index, ctx.train_batches, ctx.teacher, ctx.device, ctx.loss)
    total = sum(m.numel() for m in masks.values())
    n_fixed = sum(int(m.sum()) for m in masks.values())
    unique, entropy = value_stats(_fixed_values(model, masks))
    log.info("wfn: iteration %d/%d: %.2f%% fixed, %d values (%.2f bits/weight), mean distance %.4f, %d fixed beyond delta", index + 1,
             len(cfg.fractions), 100 * n_fixed / total, unique, entropy, info["mean_rel_distance"], info["beyond_delta"])
    return {
        "iteration": index + 1, "target_fraction": fraction, "fraction_fixed": n_fixed / total,
        "unique_values": unique, "entropy_bits": entropy, **info,
        "zero_fraction": float((values == 0).sum()) / total,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "seconds": time.perf_counter() - t0, "done": done,
        "state": {"fixed": {n: encode_mask(m) for n, m in masks.items()}},
    }


def finish(model: nn.Module, cfg: WFNConfig, ctx: Context) -> list[dict]:
    """Each fixed layer becomes a PQLayer: codebook = the layer's values (k x 1), codes = each
    weight's index. Per-layer stats with the bytes of its packed entry."""
    if is_int_codebook(ctx.codebook_dtype):
        raise ValueError(f"wfn: pack.codebook_dtype {ctx.codebook_dtype} cannot hold the fixed values exactly; use f16 or f32")
    state = (ctx.previous or {}).get("state") or {}
    stats, everything = [], []
    for name, layer in fixable(model, cfg.exclude):
        w = layer.weight.detach()
        text = state.get("fixed", {}).get(name)
        if text is None or not bool(decode_mask(text, tuple(w.shape)).all()):
            raise ValueError(f"wfn: {name} is not entirely fixed; run every iteration (the last fraction is 1.0) first")
        values, codes = torch.unique(w.cpu().float().reshape(-1), return_inverse=True)
        pq = PQLayer(layer, values[:, None], codes, block_size=1)
        set_module(model, name, pq)
        _, data = encode_pq(values[:, None], codes, pq.weight_shape, ctx.codebook_dtype)
        unique, entropy = value_stats(values[codes])
        stats.append({"layer": name, "weights": w.numel(), "unique_values": unique, "entropy_bits": entropy,
                      "bytes": len(data), "bits_per_weight": 8 * len(data) / w.numel(), "k": unique, "block_size": 1})
        everything.append(values[codes])
    unique, entropy = value_stats(torch.cat(everything))
    log.info("wfn: %d layers packed, %d values network-wide, %.3f bits/weight entropy", len(stats), unique, entropy)
    return stats


ITERATIONS = Steps(identity=identity, count=count, run=run_iteration, prepare=prepare, finish=finish,
                   batch_size=lambda cfg: cfg.batch_size, label="wfn-iteration")


METHOD = Method(
    name="wfn", config=WFNConfig,
    summary="weight fixing networks: the whole network on few power-of-two values (Subia-Waud & Dasmahapatra 2022)",
    check=check, steps=ITERATIONS, defaults=batch_size_of_teacher,
    trainable=lambda _model, _cfg: [],  # the fixed values never move again (biases and BatchNorm still tune)
    layers=(PQLayer,),
)


def fix_weights(model: nn.Module, cfg: WFNConfig, train_batches: DataLoader | None = None, teacher: nn.Module | None = None,
                device: torch.device | None = None, on_step=None, codebook_dtype: str = "f16") -> tuple[nn.Module, list[dict]]:
    """Run every iteration, then pack the layers (notebook entry point; the pipeline's loop).
    Returns the model and the per-iteration records (without their state)."""
    ctx = Context(train_batches=train_batches, teacher=teacher, device=device, codebook_dtype=codebook_dtype)
    check(model, cfg, ctx)
    records = run_steps(ITERATIONS, model, cfg, ctx, on_step=on_step)
    finish(model, cfg, ctx)
    return model, [{k: v for k, v in r.items() if k != "state"} for r in records]
