"""Product quantization as a method of the pipeline (the contract: modelpress/methods/base.py)."""

from __future__ import annotations

import torch.nn as nn

from ... import inputs as model_inputs
from ..base import Context, Method, codebooks
from .budget import check_reachable, measure, measure_key, plan_budget, table_from_json, table_to_json
from .config import PQConfig
from .layer import PQ_LAYERS
from .quantize import plan, quantize_pq


def check(model: nn.Module, cfg: PQConfig, ctx: Context) -> None:
    """Layer names, block sizes that fit each layer, and a byte budget some allocation meets."""
    plan(model, cfg, ctx.codebook_dtype)
    check_reachable(model, cfg, ctx.float_dtype, ctx.arch, ctx.meta, ctx.codebook_dtype)


def plan_settings(model: nn.Module, cfg: PQConfig, ctx: Context) -> tuple[PQConfig, list[dict]]:
    """A byte budget becomes explicit per-layer settings (and the allocation table). The damage
    of every candidate does not depend on the budget: ``ctx.cache`` keeps it, so a sweep over
    budgets measures it once."""
    if cfg.target_bytes is None:
        return cfg, []

    def damage() -> dict:
        return table_to_json(measure(model, cfg, model_inputs.take(ctx.calibration, 0, cfg.budget_images)))

    cached = ctx.cache("budget-damage", measure_key(cfg), damage) if ctx.cache else damage()
    return plan_budget(model, cfg, ctx.calibration, ctx.float_dtype, ctx.arch, ctx.meta, table_from_json(cached),
                       ctx.codebook_dtype)


def apply(model: nn.Module, cfg: PQConfig, ctx: Context) -> list[dict]:
    if ctx.calibration is None:
        raise ValueError("pq needs calibration images (calibration=...): in-domain inputs, no labels")
    return quantize_pq(model, cfg, ctx.calibration, ctx.train_batches, ctx.teacher, ctx.on_layer, ctx.codebook_dtype,
                       loss=ctx.loss)[1]


METHOD = Method(
    name="pq", config=PQConfig, summary="product quantization, layer by layer (Stock et al. 2019)",
    check=check, plan=plan_settings, apply=apply, trainable=codebooks, layers=PQ_LAYERS,
    calibration=lambda cfg: (cfg.calibration_images, cfg.seed),
)
