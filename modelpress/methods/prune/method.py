"""Pruning as methods of the pipeline (the contract: modelpress/methods/base.py): ``prune``
(iterative magnitude pruning with rewinding) and ``prune_pq`` (then quantize the survivors).
Each cycle is one step: the pipeline checkpoints after it, and a killed run resumes there."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...progress import log
from ..base import Context, Method, Steps, codebooks, run_steps
from ..pq import PQLayer
from .config import PruneConfig, PrunePQConfig
from .imp import SizeFn, check_budget, default_size, next_sparsity, prune_cycle, require_schedule
from .magnitude import masks_of, prunable, schedule
from .values import quantize_survivors, tune_codebooks

SCHEDULE_FIELDS = ("epochs", "lr", "weight_decay", "batch_size")


def with_schedule(cfg: PruneConfig, schedule_of_teacher: dict) -> PruneConfig:
    """The original training schedule (epochs, LR, weight decay, batch size) filled in from
    the teacher's where left empty."""
    fill = {k: schedule_of_teacher[k] for k in SCHEDULE_FIELDS if getattr(cfg, k) is None and k in schedule_of_teacher}
    return cfg.model_copy(update=fill)


def cycle_schedule(cfg: PruneConfig) -> list[float] | None:
    """The sparsity after each cycle when the goal is a sparsity (None for a byte budget, where
    each cycle's target follows from the model's packed size)."""
    return None if cfg.target_bytes else schedule(cfg.target_sparsity, cfg.rate, cfg.milestones)


def prepare(model: nn.Module, cfg: PruneConfig, ctx: Context) -> None:
    require_schedule(cfg)
    prunable(model, cfg.exclude)
    check_budget(model, cfg, ctx.size_fn or default_size)


def check(model: nn.Module, cfg: PruneConfig, ctx: Context) -> None:
    prepare(model, cfg, ctx)  # what step 0 checks on its model holds for the architecture already
    if cfg.retrain == "weight_rewind":
        point = round(1 - cfg.rewind_fraction, 4)
        if ctx.snapshots is None:
            raise ValueError("retrain=weight_rewind needs the weights from the teacher's own training; with "
                             "teacher.weights set there are none (use lr_rewind, or let the pipeline train the teacher)")
        if not any(abs(f - point) < 1e-4 for f in ctx.snapshots):
            raise ValueError(f"retrain=weight_rewind with rewind_fraction={cfg.rewind_fraction:g} rewinds to "
                             f"{point:g} of the teacher's schedule: add {point:g} to teacher.snapshots")


def identity(cfg: PruneConfig, index: int, ctx: Context) -> list | None:
    """What cycle ``index`` depends on: the settings that shape retraining plus the sparsities of
    cycles 0..index, so a run to 95 % reuses the cycles of a finished run to 90 % with the same
    schedule. None when the schedule has no such cycle."""
    base = cfg.model_dump(mode="json", exclude={"target_sparsity", "target_bytes", "milestones"})
    steps = cycle_schedule(cfg)
    if steps is None:
        path = ["bytes", cfg.target_bytes, ctx.float_dtype, index]
    elif index < len(steps):
        path = steps[: index + 1]
    else:
        return None
    return [base, path]


def run_cycle(model: nn.Module, cfg: PruneConfig, index: int, ctx: Context) -> dict | None:
    """Cycle ``index``: prune to the schedule's next sparsity (or the byte budget's), retrain."""
    size_fn = ctx.size_fn or default_size
    steps = cycle_schedule(cfg)
    if steps is None:
        target = next_sparsity(model, cfg, size_fn)
    else:
        target = steps[index] if index < len(steps) else None
    if target is None:
        return None
    stats = prune_cycle(model, cfg, index, target, ctx.train_batches, ctx.teacher, ctx.device, ctx.rewind_state, ctx.loss)
    stats["done"] = index == len(steps) - 1 if steps is not None else next_sparsity(model, cfg, size_fn) is None
    log.info("prune: cycle %d done, sparsity %.2f%%", stats["cycle"], 100 * stats["sparsity"])
    return stats


def count(cfg: PruneConfig) -> int | None:
    steps = cycle_schedule(cfg)
    return None if steps is None else len(steps)


CYCLES = Steps(identity=identity, count=count, run=run_cycle, label="prune-cycle", prepare=prepare, batch_size=lambda cfg: cfg.batch_size)


def _finish_pq(model: nn.Module, cfg: PrunePQConfig, ctx: Context) -> list[dict]:
    q = cfg.quantize
    stats = quantize_survivors(model, q, cfg.prune.exclude)
    teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model).eval()
    tune_codebooks(model, teacher, ctx.train_batches, q.finetune_epochs, q.finetune_lr, q.seed, ctx.device)
    log.info("prune_pq: %d layers quantized", len(stats))
    return stats


def _rewind_point(cfg: PruneConfig) -> float | None:
    return round(1 - cfg.rewind_fraction, 4) if cfg.retrain == "weight_rewind" else None


METHOD = Method(
    name="prune", config=PruneConfig,
    summary="iterative magnitude pruning with learning-rate rewinding (Renda, Frankle & Carbin 2020)",
    check=check, steps=CYCLES, defaults=with_schedule, rewind_point=_rewind_point,
    trainable=lambda model, cfg: codebooks(model) + [model.get_submodule(n).weight for n in masks_of(model, cfg.exclude)],
    held_zero=lambda model, cfg: masks_of(model, cfg.exclude),
)

PQ_METHOD = Method(
    name="prune_pq", config=PrunePQConfig, summary="pruning, then product quantization of the surviving weights",
    check=lambda model, cfg, ctx: check(model, cfg.prune, ctx),
    steps=Steps(
        identity=lambda cfg, index, ctx: identity(cfg.prune, index, ctx),
        count=lambda cfg: count(cfg.prune),
        run=lambda model, cfg, index, ctx: run_cycle(model, cfg.prune, index, ctx),
        prepare=lambda model, cfg, ctx: prepare(model, cfg.prune, ctx),
        finish=_finish_pq, batch_size=lambda cfg: cfg.prune.batch_size, label="prune-cycle",
    ),
    defaults=lambda cfg, sched: cfg.model_copy(update={"prune": with_schedule(cfg.prune, sched)}),
    rewind_point=lambda cfg: _rewind_point(cfg.prune),
    trainable=codebooks, layers=(PQLayer,),
)


def prune_imp(
    model: nn.Module, cfg: PruneConfig, train_batches: DataLoader, teacher: nn.Module | None = None,
    on_cycle=None, size_fn: SizeFn = default_size, device: torch.device | None = None,
    rewind_state: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Prune ``model`` in place, cycle after cycle, until the goal is met (notebook entry point;
    the same loop as the pipeline's). ``on_cycle(index, model, stats)`` runs after each cycle."""
    ctx = Context(train_batches=train_batches, teacher=teacher, size_fn=size_fn, device=device, rewind_state=rewind_state)
    return model, run_steps(CYCLES, model, cfg, ctx, on_step=on_cycle)


def prune_pq(
    model: nn.Module, cfg: PrunePQConfig, train_batches: DataLoader, teacher: nn.Module | None = None,
    device: torch.device | None = None, on_cycle=None,
) -> tuple[nn.Module, list[dict]]:
    """Iterative magnitude pruning, then quantization of the survivors (notebook entry point)."""
    teacher = teacher if teacher is not None else copy.deepcopy(model).eval()
    ctx = Context(train_batches=train_batches, teacher=teacher, device=device)
    run_steps(PQ_METHOD.steps, model, cfg, ctx, on_step=on_cycle)
    return model, _finish_pq(model, cfg, ctx)
