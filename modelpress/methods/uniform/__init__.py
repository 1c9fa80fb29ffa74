"""Baseline: per-channel uniform (affine) weight quantization to a few bits.

Each output channel's weights are mapped onto 2**bits evenly spaced levels between the
channel's minimum and maximum (``w ≈ offset + code * scale``). Nothing is learned from data;
the shared fine-tuning step may then tune each channel's scale and offset by distillation.
It exists so that the project's methods are measured against the standard simple thing.
"""

from .config import UniformConfig
from .layer import UniformLayer, quantize_uniform

__all__ = ["UniformConfig", "UniformLayer", "quantize_uniform"]
