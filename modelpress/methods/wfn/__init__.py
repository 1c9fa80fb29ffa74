"""Weight Fixing Networks (Subia-Waud & Dasmahapatra, ECCV 2022, arXiv:2210.13554): every
Conv2d/Linear weight of the network fixed, in iterations, onto one small network-wide set of
powers of two (and sums of two), the free weights retrained in between."""

from .config import PAPER_FRACTIONS, WFNConfig
from .method import METHOD, fix_to, fix_weights, fixable, fixed_masks
from .retrain import hold_fixed, regulariser, retrain
from .values import candidate_levels, choose, decode_mask, encode_mask, value_stats

__all__ = [
    "METHOD", "PAPER_FRACTIONS", "WFNConfig", "candidate_levels", "choose", "decode_mask", "encode_mask", "fix_to",
    "fix_weights", "fixable", "fixed_masks", "hold_fixed", "regulariser", "retrain", "value_stats",
]
