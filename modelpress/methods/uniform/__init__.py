"""Baseline: per-channel uniform (affine) weight quantization to a few bits.

Each output channel's weights are mapped onto 2**bits evenly spaced levels between the
channel's minimum and maximum (``w ≈ offset + code * scale``). Nothing is learned from data;
the shared fine-tuning step may then tune each channel's scale and offset by distillation.
It exists so that the project's methods are measured against the standard simple thing.
"""

from ...walk import check_patterns
from ..base import Method
from .config import UniformConfig
from .layer import UniformLayer, quantize_uniform

METHOD = Method(
    name="uniform", config=UniformConfig, summary="baseline: per-channel uniform (affine) quantization",
    check=lambda model, cfg, _ctx: check_patterns(model, cfg.exclude, "exclude"),
    apply=lambda model, cfg, _ctx: quantize_uniform(model, cfg)[1],
    layers=(UniformLayer,),
)

__all__ = ["METHOD", "UniformConfig", "UniformLayer", "quantize_uniform"]
