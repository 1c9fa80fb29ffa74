"""The LC algorithm (Carreira-Perpinan & Idelbayev, "Model compression as constrained
optimization, with application to neural nets"; the LC toolkit, arXiv:2005.07786): learning
(L) steps and compression (C) steps alternated by an augmented Lagrangian, for quantization,
pruning and low rank, one scheme per group of layers or several summed (additive combinations)."""

from .additive import AdditiveLayer, WeightPart
from .config import LCConfig, LCTask
from .cstep import (
    binarize,
    binarize_rows,
    keep_largest,
    kmeans_1d,
    l1_threshold,
    low_rank,
    select_rank,
    soft_threshold,
    ternarize,
    ternarize_rows,
)
from .lowrank import LowRankLayer
from .method import METHOD, assignments, c_step, compressed, lc_compress, run_step

__all__ = [
    "METHOD", "AdditiveLayer", "LCConfig", "LCTask", "LowRankLayer", "WeightPart", "assignments", "binarize", "binarize_rows",
    "c_step",
    "compressed", "keep_largest", "kmeans_1d", "l1_threshold", "lc_compress", "low_rank", "run_step", "select_rank",
    "soft_threshold", "ternarize", "ternarize_rows",
]
