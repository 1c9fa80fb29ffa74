"""Global magnitude pruning: which weights may be pruned, one threshold over all of them,
masks that stay applied while training, and the cycle schedule."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ...walk import check_patterns, matches, named_layers


def prunable(model: nn.Module, exclude: list[str] = ()) -> list[tuple[str, nn.Module]]:
    """Every Conv2d/Linear whose weight may be pruned (biases and BatchNorm never are).

    Raises ValueError for an exclusion that names no layer, or when nothing is left to prune.
    """
    check_patterns(model, list(exclude), "exclude")
    layers = [(n, m) for n, m in named_layers(model) if not matches(n, list(exclude)) and isinstance(m.weight, nn.Parameter)]
    if not layers:
        raise ValueError(f"no prunable layers in {type(model).__name__}: it has no Conv2d/Linear weight outside the exclusions")
    return layers


def masks_of(model: nn.Module, exclude: list[str] = ()) -> dict[str, torch.Tensor]:
    """Current masks (True = kept) of the prunable layers: the non-zero weights."""
    return {n: m.weight.detach() != 0 for n, m in prunable(model, exclude)}


def sparsity(model: nn.Module, exclude: list[str] = ()) -> float:
    """Share of prunable weights that are exactly zero."""
    layers = prunable(model, exclude)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / sum(m.weight.numel() for _, m in layers)


@torch.no_grad()
def prune_to(model: nn.Module, target: float, exclude: list[str] = ()) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude surviving weights, over all prunable layers together, until
    a share ``target`` of them is zero. Weights already zero stay zero. Returns the masks."""
    layers = prunable(model, exclude)
    flat = torch.cat([m.weight.detach().abs().reshape(-1).float().cpu() for _, m in layers])
    n_zero = int(round(target * flat.numel()))
    alive = flat != 0
    n_new = n_zero - int((~alive).sum())
    if n_new > 0:
        # Stable sort on magnitude (already-zero weights first): ties break by position,
        # so the same weights go on every run.
        order = torch.sort(flat, stable=True).indices
        drop = torch.zeros_like(alive)
        drop[order[:n_zero]] = True
        alive &= ~drop
    masks, start = {}, 0
    for name, m in layers:
        n = m.weight.numel()
        mask = alive[start:start + n].reshape(m.weight.shape).to(m.weight.device)
        m.weight.mul_(mask)
        masks[name] = mask
        start += n
    return masks


@contextlib.contextmanager
def keep_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Pruned weights stay zero while training: their gradients are masked (so momentum,
    weight decay and Adam moments of a zero weight stay zero) and the masks are re-applied on
    exit."""
    handles = []
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        m = mask.to(w.device, w.dtype)
        handles.append(w.register_hook(lambda g, m=m: g * m))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, mask in masks.items():
                w = model.get_submodule(name).weight
                w.mul_(mask.to(w.device, w.dtype))


def schedule(target: float, rate: float, milestones: list[float] = (), start: float = 0.0) -> list[float]:
    """Sparsity after each cycle: every cycle removes ``rate`` of the remaining weights, and the
    schedule stops exactly at each milestone and at ``target``.

    >>> schedule(0.5, 0.2)
    [0.2, 0.36, 0.488, 0.5]
    """
    out, s = [], start
    for stop in sorted({m for m in milestones if start < m < target} | {target}):
        while s < stop - 1e-9:
            s = round(min(1 - (1 - s) * (1 - rate), stop), 6)
            out.append(s)
    return out
