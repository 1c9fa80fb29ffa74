"""Retraining between fixing iterations: the free weights learn (distilled from the teacher, or
on labels) while the fixed ones are held exactly, with the paper's term pulling each free weight
toward the value it would be fixed to."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ... import inputs as model_inputs
from ...train import as_loss, fit, reseed
from .config import WFNConfig
from .values import nearest


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the Conv2d/Linear at ``name``."""
    layer = model.get_submodule(name)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"wfn: {name} is a {type(layer).__name__}, not a Conv2d/Linear")
    return layer.weight


@contextlib.contextmanager
def hold_fixed(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[Callable[..., None]]:
    """Fixed weights (mask True) get no gradient, so momentum and Adam moments never move them;
    weight decay still would, so the yielded ``reassert()`` puts every fixed weight back on its
    value exactly: call it after each optimizer step (``fit(on_step=...)``). Also done on exit."""
    held, handles = [], []
    for name, mask in masks.items():
        w = layer_weight(model, name)
        m = mask.to(w.device, torch.bool)
        held.append((w, m, w.detach().clone()))
        free = (~m).to(w.dtype)
        handles.append(w.register_hook(lambda g, free=free: g * free))

    @torch.no_grad()
    def reassert(*_args) -> None:
        for w, m, v in held:
            w.copy_(torch.where(m, v, w))

    try:
        yield reassert
    finally:
        for h in handles:
            h.remove()
        reassert()


def regulariser(model: nn.Module, masks: dict[str, torch.Tensor], values: np.ndarray,
                zero_distance: float) -> Callable[[], torch.Tensor] | None:
    """The mean squared relative distance of the free weights to their nearest value among
    ``values`` (the network's fixed values, 0 included), targets taken once, at the start of the
    retraining. None when no weight is free."""
    parts = []
    for name, mask in masks.items():
        w = layer_weight(model, name)
        free = ~mask.to(w.device)
        if not free.any():
            continue
        flat = w.detach().cpu().double().reshape(-1).numpy()
        target = torch.from_numpy(values[nearest(values, flat)]).reshape(w.shape).to(w.device, w.dtype)
        parts.append((w, free.to(w.dtype), target))  # dense tensors: cheaper than indexing the free weights
    n = sum(int(f.sum()) for _, f, _ in parts)
    if n == 0:
        return None

    def term() -> torch.Tensor:
        total = torch.stack([((w - target) * free / w.detach().abs().clamp_min(zero_distance)).square().sum()
                             for w, free, target in parts]).sum()
        return total / n

    return term


def retrain(model: nn.Module, cfg: WFNConfig, masks: dict[str, torch.Tensor], values: np.ndarray, index: int,
            batches: DataLoader | None, teacher: nn.Module | None, device: torch.device | None,
            distill_with: str | Callable = "kl") -> list[float]:
    """``cfg.epochs_per_iteration`` epochs on every parameter but the fixed weights (biases and
    BatchNorm included), seeded by the iteration (a re-run gives the same weights).

    Loss: the task loss (distillation at T=1, or cross-entropy), plus the regulariser scaled at
    each step to ``regularisation_ratio`` times the task loss (as the reference code's alpha)."""
    if cfg.loss == "distill" and teacher is None:
        raise ValueError("wfn: loss='distill' needs the teacher (teacher=...)")
    source = teacher
    if batches is None:
        raise ValueError("wfn: retraining needs training batches (train_batches=...)")
    torch.manual_seed(cfg.seed + index)
    reseed(batches, cfg.seed + index)
    reg = regulariser(model, masks, values, cfg.zero_distance) if cfg.regularisation_ratio > 0 else None
    if teacher is not None:
        teacher.eval()

    distill_task = as_loss(distill_with)

    def loss_fn(x, y: torch.Tensor) -> torch.Tensor:
        out = model_inputs.call(model, x)
        if cfg.loss == "labels":
            task = F.cross_entropy(out, y)
        else:
            assert source is not None
            with torch.no_grad():
                t = model_inputs.call(source, x)
            task = distill_task(out, t)
        if reg is None:
            return task
        r = reg()
        return task + cfg.regularisation_ratio * (task.detach() / r.detach().clamp_min(1e-12)) * r

    with hold_fixed(model, masks) as reassert:
        return fit(model, model.parameters(), batches, loss_fn, cfg.epochs_per_iteration, cfg.lr, optimizer=cfg.optimizer,
                   weight_decay=cfg.weight_decay, stage=f"wfn retrain {index + 1}", device=device, on_step=reassert)
