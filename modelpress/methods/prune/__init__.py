"""Iterative magnitude pruning with learning-rate rewinding (Renda, Frankle & Carbin 2020),
and pruning followed by quantization of the surviving weights."""

from .config import PruneConfig, PrunePQConfig, ValueQuantConfig
from .imp import next_sparsity, prune_cycle
from .magnitude import keep_masks, masks_of, prunable, prune_to, schedule, sparsity
from .method import METHOD, PQ_METHOD, prune_imp, prune_pq
from .values import quantize_survivors, tune_codebooks

__all__ = [
    "METHOD", "PQ_METHOD", "PruneConfig", "PrunePQConfig", "ValueQuantConfig", "keep_masks", "masks_of", "next_sparsity", "prunable",
    "prune_cycle", "prune_imp", "prune_pq", "prune_to", "quantize_survivors", "schedule", "sparsity", "tune_codebooks",
]
