"""Iterative magnitude pruning with learning-rate rewinding (Renda, Frankle & Carbin 2020),
and pruning followed by quantization of the surviving weights."""

from .config import PruneConfig, PrunePQConfig, ValueQuantConfig
from .imp import next_sparsity, prune_cycle, prune_imp
from .magnitude import keep_masks, masks_of, prunable, prune_to, schedule, sparsity
from .values import prune_pq, quantize_survivors, tune_codebooks

__all__ = [
    "PruneConfig", "PrunePQConfig", "ValueQuantConfig", "keep_masks", "masks_of", "next_sparsity", "prunable",
    "prune_cycle", "prune_imp", "prune_pq", "prune_to", "quantize_survivors", "schedule", "sparsity", "tune_codebooks",
]
