"""The C steps of the LC algorithm: theta = argmin ||v - Delta(theta)||^2 for a given v
(= w - lambda / mu), one small pure function per scheme, each exact or, for the adaptive
codebook, Lloyd's algorithm run to a fixed point from a warm start.

Every function takes float tensors and returns the compressed weights Delta(theta) (same shape)
with what defines them (codebook, codes, mask, factors), so the method can both measure
||w - Delta(theta)|| and pack theta.
"""

from __future__ import annotations

import math

import torch


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1).double()


def kmeans_1d(v: torch.Tensor, k: int, init: torch.Tensor | None = None, iters: int = 100,
              bins: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive quantization: the k values (sorted) and each weight's code minimising the squared
    error. Lloyd's algorithm in 1-D (a weight goes to the nearest value: intervals between
    midpoints, so an iteration is a search in the sorted weights, O(k log n)), started from the
    exact optimum of the weights grouped into ``bins`` equal-count groups (dynamic programming;
    exact outright when there are at most ``bins`` weights), and from ``init`` too when given
    (the previous C step's codebook: the LC toolkit's warm start): the better of the two is kept.
    Returns (codebook (k,), codes (n,))."""
    x = _flat(v)
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    if x.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    xs, _ = torch.sort(x)
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs, 0)])
    starts = [_dp_centres(xs, csum, k, bins)]
    if init is not None and init.numel() == k:
        starts.append(torch.sort(init.detach().double().reshape(-1))[0])
    best = None
    for c in starts:
        c = _lloyd(xs, csum, c, iters)
        codes = _nearest(c, x)
        sse = float((x - c[codes]).square().sum())
        if best is None or sse < best[0]:
            best = (sse, c, codes)
    assert best is not None
    return best[1].float(), best[2]


def _lloyd(xs: torch.Tensor, csum: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    n = xs.numel()
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        edges = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(xs, mids, right=True),
                           torch.full((1,), n, dtype=torch.long)])
        counts = edges[1:] - edges[:-1]
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new, _ = torch.sort(torch.where(counts > 0, sums / counts.clamp_min(1), c))  # an empty value keeps its place
        if torch.equal(new, c):
            break
        c = new
    return c


def _dp_centres(xs: torch.Tensor, csum: torch.Tensor, k: int, bins: int) -> torch.Tensor:
    """The optimal k-means of the sorted ``xs`` (``csum``: their prefix sums from 0) grouped into
    at most ``bins`` consecutive equal-count groups (each group kept whole), by dynamic
    programming over the groups."""
    n = xs.numel()
    edges = torch.linspace(0, n, min(n, bins) + 1).round().long().unique()
    counts = (edges[1:] - edges[:-1]).double()
    sq = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs * xs, 0)])
    b = counts.numel()
    if k >= b:  # a value per group (and spare values at the top)
        means = (csum[edges[1:]] - csum[edges[:-1]]) / counts
        return torch.cat([means, means[-1:].expand(k - b)])
    # cost[a, z]: squared error of the weights of groups a..z around their mean (z >= a)
    lo, hi = edges[:-1], edges[1:]
    cnt = (hi[None, :] - lo[:, None]).double()
    s1 = csum[hi][None, :] - csum[lo][:, None]
    s2 = sq[hi][None, :] - sq[lo][:, None]
    upper = torch.triu(torch.ones(b, b, dtype=torch.bool))
    cost = torch.where(upper, s2 - s1 * s1 / cnt.clamp_min(1), torch.full((b, b), torch.inf, dtype=torch.float64))
    best = cost[0].clone()  # one value for groups 0..z
    choice = []
    for _ in range(1, k):  # best[z] with one more value: the last one covers groups a..z
        prev = torch.cat([torch.full((1,), torch.inf, dtype=torch.float64), best[:-1]])
        total = prev[:, None] + cost
        best, arg = total.min(0)
        choice.append(arg)
    cuts, z = [], b - 1
    for arg in reversed(choice):
        a = int(arg[z])
        cuts.append(a)
        z = a - 1
    bounds = [0, *reversed(cuts), b]
    return torch.stack([(csum[edges[e]] - csum[edges[a]]) / (edges[e] - edges[a]) for a, e in zip(bounds, bounds[1:])])


def _nearest(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``c`` for each of ``x`` (ties to the lower)."""
    if c.numel() == 1:
        return torch.zeros(x.numel(), dtype=torch.long)
    mids = (c[1:] + c[:-1]) / 2
    return torch.searchsorted(mids.to(x.dtype), x, right=False)


def binarize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled binarization with one scale per row of ``v`` viewed as out x rest (per output
    channel): for each row, argmin over c >= 0 and s in {-1, +1}^n of ||v - c s||^2 is s = sign(v)
    (+1 at 0), c = mean |v|. Returns (scales (out,), codes (out, rest) 0/1 for -scale, +scale)."""
    x = v.detach().double().reshape(v.shape[0], -1)
    return x.abs().mean(1).float(), (x >= 0).long()


def ternarize_rows(v: torch.Tensor, nonzero: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled ternarization with one scale per row of ``v`` viewed as out x rest (per output
    channel): for each row, argmin over c >= 0 and s in {-1, 0, +1}^n of ||v - c s||^2, with at
    most ``nonzero`` x n of s non-zero when given (at least one). For the t largest magnitudes
    non-zero, the best c is their mean and the error is ||v||^2 - (sum of the t largest |v|)^2 / t,
    so t maximises S_t^2 / t over the allowed t (closed form after a sort, every row at once).
    Returns (scales (out,), codes (out, rest) 0/1/2 for -scale, 0, +scale)."""
    x = v.detach().double().reshape(v.shape[0], -1)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0]), torch.zeros(x.shape, dtype=torch.long)
    mags, order = torch.sort(x.abs(), dim=1, descending=True)
    s = torch.cumsum(mags, 1)
    most = x.shape[1] if nonzero is None else max(1, min(x.shape[1], math.floor(nonzero * x.shape[1])))
    t = torch.argmax(s[:, :most] ** 2 / torch.arange(1, most + 1, dtype=torch.float64), dim=1) + 1  # (out,)
    c = s.gather(1, (t - 1)[:, None])[:, 0] / t
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, torch.arange(x.shape[1]).expand_as(x) < t[:, None])
    codes = torch.where(keep, torch.where(x >= 0, 2, 0), 1).long()
    return c.float(), codes


def binarize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled binarization with one scale for all of ``v`` (:func:`binarize_rows` of one row).
    Returns (codebook [-c, c], codes 0/1)."""
    x = _flat(v)
    if x.numel() == 0:
        return torch.zeros(2), torch.zeros(0, dtype=torch.long)
    c, codes = binarize_rows(x[None])
    return torch.stack([-c[0], c[0]]), codes[0]


def ternarize(v: torch.Tensor, nonzero: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled ternarization with one scale for all of ``v`` (:func:`ternarize_rows` of one row).
    Returns (codebook [-c, 0, c], codes 0/1/2)."""
    x = _flat(v)
    if x.numel() == 0:
        return torch.zeros(3), torch.zeros(0, dtype=torch.long)
    c, codes = ternarize_rows(x[None], nonzero)
    return torch.stack([-c[0], torch.zeros(()), c[0]]), codes[0]


def keep_largest(vs: list[torch.Tensor], kappa: int) -> list[torch.Tensor]:
    """The l0 constraint, argmin ||v - theta||^2 subject to at most ``kappa`` non-zeros over all
    of ``vs`` together: keep the kappa largest magnitudes (ties broken by position), zero the rest.
    Returns one bool mask per tensor."""
    sizes = [v.numel() for v in vs]
    x = torch.cat([_flat(v) for v in vs]) if vs else torch.zeros(0, dtype=torch.float64)
    kappa = max(0, min(int(kappa), x.numel()))
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    if kappa:
        keep[torch.topk(x.abs(), kappa, sorted=False).indices] = True
    return [m.reshape(v.shape) for m, v in zip(torch.split(keep, sizes), vs)]


def l1_threshold(vs: list[torch.Tensor], radius: float) -> float:
    """The l1 constraint, argmin ||v - theta||^2 subject to ||theta||_1 <= radius over all of
    ``vs``: soft thresholding at the tau this returns (the projection onto the l1 ball, Duchi et
    al. 2008); 0 when v is already inside."""
    x = torch.cat([_flat(v).abs() for v in vs])
    if radius < 0:
        raise ValueError(f"l1 radius must be >= 0 (got {radius})")
    if float(x.sum()) <= radius:
        return 0.0
    mags, _ = torch.sort(x, descending=True)
    cums = torch.cumsum(mags, 0)
    j = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    rho = int(torch.nonzero(mags - (cums - radius) / j > 0).max()) + 1
    return float((cums[rho - 1] - radius) / rho)


def soft_threshold(v: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - tau).clamp_min(0)


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight as is; a Conv2d weight (out, in, kh, kw) as (out, in * kh * kw)."""
    return w.reshape(w.shape[0], -1)


def low_rank(v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD, argmin ||V - U W||^2 over rank-``rank`` factors (Eckart-Young): returns
    U (out, r) = first r left singular vectors times the singular values, W (r, in)."""
    m = as_matrix(v).double()
    rank = max(1, min(int(rank), min(m.shape)))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def select_rank(v: torch.Tensor, mu: float, alpha: float, cost_per_rank: float) -> int:
    """Rank selection (Idelbayev & Carreira-Perpinan, CVPR 2020): the rank r minimising
    alpha * C(r) + mu / 2 * sum_{i > r} s_i^2, with C(r) = r * cost_per_rank (the FLOPs or bytes a
    unit of rank costs). A rank whose factors cost as much as the full matrix is never chosen
    (0 returned then: keep the layer as it is)."""
    m = as_matrix(v).double()
    s = torch.linalg.svdvals(m)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0])[1:], torch.zeros(1, dtype=torch.float64)])
    full = min(m.shape)
    ranks = torch.arange(1, full + 1, dtype=torch.float64)
    total = alpha * ranks * cost_per_rank + mu / 2 * tail
    out, inp = m.shape
    useful = ranks * (out + inp) < out * inp
    if not bool(useful.any()):
        return 0
    total = torch.where(useful, total, torch.full_like(total, math.inf))
    best = int(torch.argmin(total)) + 1
    dense = alpha * out * inp / (out + inp) * cost_per_rank  # the full matrix's cost, in the same units
    return best if float(total[best - 1]) < dense else 0
