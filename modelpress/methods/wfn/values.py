"""The values weights are fixed to, and the rule that picks them.

Candidate values are signed sums of at most ``order`` powers of two (order 1: powers of two),
symmetric around zero, plus 0 for every weight below ``zero_distance`` (gamma_0). Every value is
exact in float16 (at most 11 significant bits, exponents within float16's range), so the packed
file's f16 (or f32) codebooks hold them bit for bit.

The fixing rule (one iteration, network-wide): each free weight's nearest candidate is the value
it would be fixed to, at relative distance |w - c| / |w|. Values are taken in decreasing number
of free weights nearest to them (the most shared value first), and within one value the closest
weights first, until the iteration's count is reached. What one value may take is bounded by
``delta`` in one of two ways (``rule``):

- ``mean`` (the reference code's ``find_the_next_cluster``): the longest run of its closest
  weights whose *mean* relative distance is within ``delta``;
- ``each``: every weight whose own relative distance is within ``delta``.

Powers of two are tried first; a higher order only for what they cannot reach. When even the
highest order cannot reach the count, the allowed distance doubles until it can (as the
reference code does: fix the rest to their nearest value, the most shared values first).
"""

from __future__ import annotations

import base64
import math
import zlib

import numpy as np
import torch

RULES = ("mean", "each")  # how delta bounds what one value takes (choose)
SPAN = 10  # the terms of one value lie within 2**SPAN of each other: 11 significant bits, float16's mantissa
F16_MIN_EXP, F16_MAX_EXP = -24, 15  # float16: smallest subnormal 2**-24, largest power of two 2**15


def _exponent_range(zero_distance: float, max_abs: float) -> tuple[int, int]:
    lo = max(F16_MIN_EXP, math.floor(math.log2(zero_distance)))
    hi = min(F16_MAX_EXP, max(lo, math.ceil(math.log2(max_abs)) if max_abs > 0 else lo))
    return lo, hi


def _f16_exact(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(np.float64) == v


def candidate_levels(max_order: int, zero_distance: float, max_abs: float) -> list[np.ndarray]:
    """Sorted candidate values (float64, symmetric, with 0) of orders <= 1, <= 2, ... <= max_order.

    Magnitudes run from the power of two at or below ``zero_distance`` to the one at or above
    ``max_abs``."""
    lo, hi = _exponent_range(zero_distance, max_abs)
    exps = np.arange(lo, hi + 1)
    terms = [np.ldexp(1.0, exps)]
    if max_order >= 2:
        a2, d2 = (g.reshape(-1) for g in np.meshgrid(np.arange(lo, hi + 1), np.arange(-SPAN, 0), indexing="ij"))
        b2 = a2 + d2
        ok = b2 >= F16_MIN_EXP
        base, small = np.ldexp(1.0, a2[ok]), np.ldexp(1.0, b2[ok])
        terms.append(np.concatenate([base + small, base - small]))
    if max_order >= 3:
        grid = np.meshgrid(np.arange(lo, hi + 1), np.arange(-SPAN, 0), np.arange(-SPAN, 0), indexing="ij")
        a3, db, dc = (g.reshape(-1) for g in grid)
        keep = db > dc
        a3, b3, c3 = a3[keep], a3[keep] + db[keep], a3[keep] + dc[keep]
        ok = c3 >= F16_MIN_EXP
        base, mid, small = np.ldexp(1.0, a3[ok]), np.ldexp(1.0, b3[ok]), np.ldexp(1.0, c3[ok])
        terms.append(np.concatenate([base + mid + small, base + mid - small, base - mid + small, base - mid - small]))
    levels, acc = [], np.zeros(0)
    top = 2.0 ** hi
    for t in terms:
        t = t[(t >= 2.0 ** lo) & (t <= top)]
        t = t[_f16_exact(t)]
        acc = np.union1d(acc, t)
        levels.append(np.concatenate([-acc[::-1], [0.0], acc]))
    return levels


def nearest(candidates: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Index of the nearest candidate (sorted) of each weight; ties go to the smaller magnitude."""
    pos = np.searchsorted(candidates, w)
    left = np.clip(pos - 1, 0, len(candidates) - 1)
    right = np.clip(pos, 0, len(candidates) - 1)
    dl, dr = np.abs(w - candidates[left]), np.abs(candidates[right] - w)
    pick_right = (dr < dl) | ((dr == dl) & (np.abs(candidates[right]) < np.abs(candidates[left])))
    return np.where(pick_right, right, left)


def _allowed(rel: np.ndarray, ci: np.ndarray, d: float, rule: str) -> np.ndarray:
    """Which free weights (relative distance ``rel`` to their nearest value ``ci``) the rule lets
    their value take at allowed distance ``d``."""
    if d >= 8:
        return np.ones(rel.size, bool)  # termination guard: anything
    if rule == "each":
        return rel <= d
    order = np.lexsort((rel, ci))  # by value, closest first
    r, g = rel[order], ci[order]
    csum = np.cumsum(r)
    start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # first position of each value's run
    run = np.repeat(np.arange(start.size), np.diff(np.r_[start, g.size]))
    before = np.r_[0.0, csum][start][run]  # the sum of earlier values' runs
    count = np.arange(g.size) - start[run] + 1
    ok = np.empty(rel.size, bool)
    ok[order] = (csum - before) / count <= d  # running mean of sorted distances: a prefix per value
    return ok


def choose(w: np.ndarray, needed: int, levels: list[np.ndarray], delta: float, zero_distance: float,
           rule: str = "mean") -> tuple[np.ndarray, np.ndarray, dict]:
    """The fixing rule on the free weights ``w`` (1-D): which ``needed`` of them to fix, and to
    what. Returns (positions in ``w``, values, info: ``delta_used``, ``beyond_delta`` (weights
    fixed further than ``delta``), ``mean_rel_distance``, ``max_rel_distance``, ``order_reached``)."""
    if rule not in RULES:
        raise ValueError(f"unknown fixing rule {rule!r}: one of {', '.join(RULES)}")
    w = np.asarray(w, np.float64)
    needed = min(int(needed), w.size)
    chosen = np.zeros(w.size, bool)
    values = np.zeros(w.size)
    rel_of = np.zeros(w.size)
    small = np.abs(w) < zero_distance
    remaining, level, d = needed, 0, delta
    while remaining > 0:
        cands = levels[level]
        zero = int(np.searchsorted(cands, 0.0))
        free = np.flatnonzero(~chosen)
        wf = w[free]
        ci = nearest(cands, wf)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(wf - cands[ci]) / np.abs(wf)
        sm = small[free]
        ci[sm], rel[sm] = zero, 0.0
        ok = np.flatnonzero(_allowed(rel, ci, d, rule))
        if ok.size:
            counts = np.bincount(ci[ok] if rule == "each" else ci, minlength=len(cands))
            rank = np.empty(len(cands), np.int64)
            rank[np.argsort(-counts, kind="stable")] = np.arange(len(cands))
            order = np.lexsort((rel[ok], rank[ci[ok]]))[:remaining]  # the most shared value first, closest weights first
            sel = ok[order]
            chosen[free[sel]] = True
            values[free[sel]] = cands[ci[sel]]
            rel_of[free[sel]] = rel[sel]
            remaining -= sel.size
        if remaining > 0:
            if level < len(levels) - 1:
                level += 1
            else:
                d *= 2
    idx = np.flatnonzero(chosen)
    info = {
        "delta_used": d, "order_reached": level + 1,
        "beyond_delta": int((rel_of[idx] > delta).sum()),
        "mean_rel_distance": float(rel_of[idx].mean()) if idx.size else 0.0,
        "max_rel_distance": float(rel_of[idx].max()) if idx.size else 0.0,
    }
    return idx, values[idx], info


def value_stats(values: torch.Tensor | np.ndarray) -> tuple[int, float]:
    """(number of unique values, entropy of their distribution in bits per weight)."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if v.size == 0:
        return 0, 0.0
    _, counts = np.unique(v.reshape(-1), return_counts=True)
    p = counts / counts.sum()
    return int(counts.size), float(-(p * np.log2(p)).sum())


def encode_mask(mask: torch.Tensor) -> str:
    """A bool mask, compact and JSON-safe: base64 of the zlib-compressed packed bits."""
    bits = np.packbits(mask.detach().cpu().numpy().reshape(-1).astype(bool))
    return base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode("ascii")


def decode_mask(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    if bits.size != (n + 7) // 8:
        raise ValueError(f"fixed mask of {bits.size * 8} bits does not fit a weight of shape {tuple(shape)}")
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(bool).reshape(shape))
