"""Iterative magnitude pruning: prune globally, retrain, repeat (Renda, Frankle & Carbin 2020).

``prune_cycle`` is one cycle and the unit a pipeline checkpoints and retries; ``prune_imp``
runs all of them (the notebook entry point). A cycle depends only on the model it starts
from and its index (every random choice is seeded from both), so a cycle re-run after a crash
gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ... import inputs as model_inputs
from ...pack import packed_nbytes
from ...train import as_loss, fit, reseed
from .config import PruneConfig
from .magnitude import keep_masks, prune_to, schedule, sparsity

MAX_SPARSITY = 0.999
SizeFn = Callable[[nn.Module], int]
CycleCallback = Callable[[int, nn.Module, dict], None]


def default_size(model: nn.Module) -> int:
    """Bytes of the packed file the model would make (fp16 storage)."""
    return packed_nbytes(model)


def _size_at(model: nn.Module, target: float, cfg: PruneConfig, size_fn: SizeFn) -> int:
    trial = copy.deepcopy(model)
    prune_to(trial, target, cfg.exclude)
    return size_fn(trial)


def check_budget(model: nn.Module, cfg: PruneConfig, size_fn: SizeFn = default_size) -> None:
    """Refuse a byte budget that no sparsity can meet, naming the smallest reachable size."""
    if cfg.target_bytes is None:
        return
    smallest = _size_at(model, MAX_SPARSITY, cfg, size_fn)
    if smallest > cfg.target_bytes:
        raise ValueError(
            f"target_bytes={cfg.target_bytes} cannot be met by pruning: the smallest reachable packed size is "
            f"{smallest} bytes (at {MAX_SPARSITY:.1%} sparsity; the unprunable tensors alone take most of it)"
        )


def next_sparsity(model: nn.Module, cfg: PruneConfig, size_fn: SizeFn = default_size) -> float | None:
    """The sparsity the next cycle prunes to, or None when the goal is already met."""
    current = sparsity(model, cfg.exclude)
    if cfg.target_bytes is None:
        steps = schedule(cfg.target_sparsity, cfg.rate, cfg.milestones, start=current)
        return steps[0] if steps else None
    if size_fn(model) <= cfg.target_bytes:
        return None
    step = min([1 - (1 - current) * (1 - cfg.rate), MAX_SPARSITY] + [m for m in cfg.milestones if m > current + 1e-9])
    if _size_at(model, step, cfg, size_fn) > cfg.target_bytes:
        return round(step, 6)
    lo, hi = current, step  # the budget is met somewhere in (lo, hi]: find the least pruning that meets it
    for _ in range(20):
        mid = (lo + hi) / 2
        if _size_at(model, mid, cfg, size_fn) <= cfg.target_bytes:
            hi = mid
        else:
            lo = mid
    return hi


def require_schedule(cfg: PruneConfig) -> None:
    missing = [f for f in ("epochs", "lr", "weight_decay") if getattr(cfg, f) is None]
    if missing:
        raise ValueError(f"prune: set {', '.join(missing)} (the original training schedule that retraining replays)")


def prune_cycle(
    model: nn.Module,
    cfg: PruneConfig,
    index: int,
    target: float,
    train_batches: DataLoader,
    teacher: nn.Module | None = None,
    device: torch.device | None = None,
    rewind_state: dict[str, torch.Tensor] | None = None,
    distill_with: str | Callable = "kl",
) -> dict:
    """Cycle ``index`` (0-based): prune globally to ``target`` sparsity, then retrain the
    survivors with the configured schedule while the masks hold. Returns the cycle's stats.

    ``retrain="weight_rewind"`` needs ``rewind_state``: the model's state at the point of the
    original training that the replayed schedule starts from (1 - rewind_fraction)."""
    require_schedule(cfg)
    if cfg.loss == "distill" and teacher is None:
        raise ValueError("prune: loss='distill' needs the teacher")
    if cfg.retrain == "weight_rewind" and rewind_state is None:
        raise ValueError("prune: retrain='weight_rewind' needs the weights from the original training (rewind_state)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + index)
    reseed(train_batches, cfg.seed + index)
    masks = prune_to(model, target, cfg.exclude)  # chosen on the trained weights' magnitudes
    if rewind_state is not None and cfg.retrain == "weight_rewind":
        model.load_state_dict(rewind_state)
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_submodule(name).weight.mul_(mask)
    epochs = cfg.rewind_fraction * cfg.epochs
    if cfg.loss == "labels":
        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)
    else:
        task = as_loss(distill_with)

        def loss_fn(x, _y):  # inputs of any structure (a dict of input_ids and attention_mask...)
            with torch.no_grad():
                t = model_inputs.call(teacher, x)
            return task(model_inputs.call(model, x), t)
    if cfg.retrain in ("lr_rewind", "weight_rewind"):
        sched = dict(lr=cfg.lr, schedule="cosine", schedule_epochs=cfg.epochs, warmup_frac=cfg.warmup_fraction)
    else:
        sched = dict(lr=cfg.finetune_lr, schedule="constant")
    stage = f"prune cycle {index + 1} ({target:.1%})"
    with keep_masks(model, masks):
        losses = fit(model, model.parameters(), train_batches, loss_fn, epochs, optimizer="sgd",
                     weight_decay=cfg.weight_decay, stage=stage, device=device, **sched)
    kept = sum(int(m.sum()) for m in masks.values())
    return {
        "cycle": index + 1, "target_sparsity": target, "sparsity": sparsity(model, cfg.exclude),
        "kept_weights": kept, "prunable_weights": sum(m.numel() for m in masks.values()),
        "retrain": cfg.retrain, "retrain_epochs": epochs, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds": time.perf_counter() - t0,
    }
