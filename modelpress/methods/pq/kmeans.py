"""k-means in the metric of a layer's input activations (the pure math of PQ).

Stock et al. learn each layer's codebook by minimising the error of the layer's *output*,
sum_j ||X (w_j - c_{a(j)})||^2, over sub-vectors w_j of the weight. Expanding the square,

    ||X (w - c)||^2 = (w - c)^T G (w - c),   G = X^T X   (d x d),

so the activations enter only through G. Assignment is an (n x k) matrix product and the
centroid minimising the sum over its members is their plain mean (for any PSD G). No step
touches the activation rows, which is what makes this orders of magnitude faster than
broadcasting over them.

One G shared by every block position of a row averages the input channels together; a few
channels with much larger activations (transformers have them) then weigh little. With one Gram
per block position (``position_kmeans``: G_p over the input channels of position p) each
sub-vector is measured in its own position's metric, and a centroid is the G-weighted mean of its
members, c = (sum G_p(i))^-1 sum G_p(i) w_i.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 18  # elements of one (n x k) score block: small blocks stay in cache (6x faster than 1 << 24)


def _scores(w: torch.Tensor, wg: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(n, k) distances up to the per-row constant w^T G w (which does not change argmin)."""
    cgc = ((c @ g) * c).sum(1)
    return cgc.unsqueeze(0) - 2.0 * (wg @ c.T)


def assign(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of w in the G-metric."""
    wg = w @ g
    step = max(1, _CHUNK // max(1, c.shape[0]))
    return torch.cat([_scores(w[i:i + step], wg[i:i + step], c, g).argmin(1) for i in range(0, w.shape[0], step)])


def objective(w: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, g: torch.Tensor) -> float:
    """sum_j (w_j - c_{a(j)})^T G (w_j - c_{a(j)}) = ||X (W - W_hat)||^2."""
    r = w - c[codes]
    return float(((r @ g) * r).sum())


def _kmeans_pp(w: torch.Tensor, k: int, g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with distances measured in the G-metric."""
    n = w.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [w[first]]
    wg = w @ g
    wgw = (wg * w).sum(1)
    d2 = (wgw - 2 * wg @ w[first] + (w[first] @ g @ w[first])).clamp_min(0)
    for _ in range(1, k):
        total = float(d2.sum())
        idx = int(torch.multinomial(d2 / total, 1, generator=gen)) if total > 0 else int(torch.randint(n, (1,), generator=gen))
        c = w[idx]
        centers.append(c)
        d2 = torch.minimum(d2, (wgw - 2 * wg @ c + c @ g @ c).clamp_min(0))
    return torch.stack(centers)


def _repair_empty(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """Split the most populated cluster into each empty one (as in Stock et al.)."""
    empty = (counts == 0).nonzero().flatten().tolist()
    for e in empty:
        big = int(counts.argmax())
        eps = 1e-4 * c[big].abs().clamp_min(1e-8) * torch.randn(c.shape[1], generator=gen)
        c[e] = c[big] + eps
        c[big] = c[big] - eps
        counts[e] = counts[big] // 2
        counts[big] -= counts[e]
    return len(empty)


def gram_kmeans(
    w: torch.Tensor,
    k: int,
    g: torch.Tensor | None = None,
    iters: int = 20,
    seed: int = 0,
    init: str = "kmeans++",
    repair_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cluster the rows of ``w`` (n, d) into ``k`` centroids in the metric ``g`` (d, d).

    ``g=None`` is plain weight-space k-means (G = identity). Returns
    ``(centroids (k, d), codes (n,), info)`` where the codes are the final assignment to
    the returned centroids and ``info`` has the objective and repair counts.
    """
    w = w.detach().double()
    n, d = w.shape
    if k > n:
        raise ValueError(f"k={k} centroids for only {n} sub-vectors")
    g = torch.eye(d, dtype=w.dtype) if g is None else g.detach().double()
    gen = torch.Generator().manual_seed(seed)
    if init == "kmeans++":
        c = _kmeans_pp(w, k, g, gen)
    elif init == "random":
        c = w[torch.randperm(n, generator=gen)[:k]].clone()
    elif init == "linear":  # Deep Compression's choice for scalar weight sharing
        if d != 1:
            raise ValueError("linear k-means initialisation needs sub-vectors of length 1")
        c = torch.linspace(float(w.min()), float(w.max()), k, dtype=w.dtype).unsqueeze(1)
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    repaired = 0
    codes = assign(w, c, g)
    for _ in range(iters):
        counts = torch.bincount(codes, minlength=k)
        if repair_empty and (counts == 0).any():
            repaired += _repair_empty(c, counts, gen)
            codes = assign(w, c, g)
            counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, codes, w)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(w.dtype)
        new_codes = assign(w, c, g)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    # Final centroids are the means of the final assignment: codes and centroids agree.
    counts = torch.bincount(codes, minlength=k)
    sums = torch.zeros_like(c).index_add_(0, codes, w)
    nonempty = counts > 0
    c[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(w.dtype)
    info = {"objective": objective(w, c, codes, g), "empty_repaired": repaired, "empty_final": int((counts == 0).sum())}
    return c.float(), codes, info


# ---- one Gram per block position --------------------------------------------------------------

def _assign_positions(wp: torch.Tensor, c: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """(P, m) index of the nearest centroid of each sub-vector wp[p, i] in its position's metric."""
    step = max(1, _CHUNK // max(1, wp.shape[1] * c.shape[0]))
    out = []
    for i in range(0, wp.shape[0], step):
        w, g = wp[i:i + step], gs[i:i + step]
        cgc = torch.einsum("kd,pde,ke->pk", c, g, c)
        out.append((cgc.unsqueeze(1) - 2.0 * torch.matmul(torch.matmul(w, g), c.T)).argmin(2))
    return torch.cat(out)


def _weighted_centroids(wp: torch.Tensor, codes: torch.Tensor, gs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Each centroid: argmin_c sum over its members of (w - c)^T G_p (w - c); empty ones stay."""
    p_count, m, d = wp.shape
    k = c.shape[0]
    flat = (torch.arange(p_count).unsqueeze(1) * k + codes).reshape(-1)
    counts = torch.bincount(flat, minlength=p_count * k).reshape(p_count, k).to(wp.dtype)
    sums = torch.zeros(p_count * k, d, dtype=wp.dtype).index_add_(0, flat, wp.reshape(-1, d)).reshape(p_count, k, d)
    a = torch.einsum("pk,pde->kde", counts, gs)
    b = torch.einsum("pde,pke->kd", gs, sums)
    new = c.clone()
    nonempty = counts.sum(0) > 0
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-30) / d
    a = a + ridge[:, None, None] * torch.eye(d, dtype=wp.dtype)
    solved, info = torch.linalg.solve_ex(a[nonempty], b[nonempty])
    means = sums.sum(0)[nonempty] / counts.sum(0)[nonempty].unsqueeze(1)
    new[nonempty] = torch.where((info == 0).unsqueeze(1), solved, means)  # a singular metric: the plain mean
    return new


def position_kmeans(
    w: torch.Tensor,
    k: int,
    gs: torch.Tensor,
    iters: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k-means of the sub-vectors of a weight ``w`` (rows, P * d), one metric per block position:
    ``gs`` (P, d, d), G_p over the input channels p * d .. (p + 1) * d. Seeded by k-means++ in the
    mean metric. Returns ``(centroids (k, d), codes (rows * P,) in to_subvectors order, info)``."""
    p_count, d = gs.shape[0], gs.shape[1]
    rows = w.detach().double().reshape(-1, p_count, d)
    wp = rows.transpose(0, 1).contiguous()  # (P, rows, d)
    flat_w = rows.reshape(-1, d)
    if k > flat_w.shape[0]:
        raise ValueError(f"k={k} centroids for only {flat_w.shape[0]} sub-vectors")
    gs = gs.detach().double()
    gen = torch.Generator().manual_seed(seed)
    c = _kmeans_pp(flat_w, k, gs.mean(0), gen)
    codes = _assign_positions(wp, c, gs)
    for _ in range(iters):
        c = _weighted_centroids(wp, codes, gs, c)
        new_codes = _assign_positions(wp, c, gs)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    c = _weighted_centroids(wp, codes, gs, c)
    r = wp - c[codes]
    objective_ = float(torch.einsum("pmd,pde,pme->", r, gs, r))
    codes_flat = codes.T.reshape(-1)  # back to row-major (row, position) order
    counts = torch.bincount(codes_flat, minlength=k)
    return c.float(), codes_flat, {"objective": objective_, "empty_repaired": 0, "empty_final": int((counts == 0).sum())}
