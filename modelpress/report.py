"""Result tables and plots (PNG, written with matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write


def _save(fig, path: str | Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), [buf.getvalue()])
    return Path(path)


def plot_cycles(cycles: list[dict], path: str | Path, teacher_top1: float | None = None, title: str = "") -> Path:
    """Accuracy vs sparsity over pruning cycles, with the packed size on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [100 * c["sparsity"] for c in cycles]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, [c["top1"] for c in cycles], "o-", label="top-1 after cycle")
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="grey", ls="--", label=f"teacher {teacher_top1:.2f}%")
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel("top-1 (%)")
    ax2 = ax.twinx()
    ax2.plot(s, [c["packed_bytes"] / 1024 for c in cycles], "s:", color="tab:red", label="packed KiB")
    ax2.set_ylabel("packed size (KiB)", color="tab:red")
    ax.legend(loc="lower left")
    ax.set_title(title or "iterative magnitude pruning")
    return _save(fig, path)


def plot_steps(steps: list[dict], path: str | Path, teacher_top1: float | None = None, title: str = "",
               label: str = "step") -> Path:
    """Top-1 and packed size after each step of an iterative method (WFN iterations, LC steps),
    with ||w - Delta(theta)|| / ||w|| on a third scale when the steps report it (LC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(steps)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [c["top1"] for c in steps], "o-", label="top-1 after step")
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="grey", ls="--", label=f"teacher {teacher_top1:.2f}%")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 (%)")
    ax2 = ax.twinx()
    ax2.plot(x, [c["packed_bytes"] / 1024 for c in steps], "s:", color="tab:red", label="packed KiB")
    ax2.set_ylabel("packed size (KiB)", color="tab:red")
    if all("relative_distance" in c for c in steps):
        ax3 = ax.twinx()
        ax3.spines["right"].set_position(("axes", 1.15))
        ax3.semilogy(x, [max(c["relative_distance"], 1e-9) for c in steps], "^--", color="tab:green")
        ax3.set_ylabel("||w - Δ(θ)|| / ||w||", color="tab:green")
    ax.legend(loc="lower left")
    ax.set_title(title)
    return _save(fig, path)


def pareto_front(rows: list[dict], x: str = "packed_bytes", y: str = "top1") -> list[dict]:
    """Mark each row ``on_front``: no other row is at most as large and at least as accurate
    (and better in one of the two). Returns the rows sorted by size."""
    rows = sorted(rows, key=lambda r: (r[x], -r[y]))
    best = float("-inf")
    for r in rows:
        r["on_front"] = r[y] > best
        best = max(best, r[y])
    return rows


METRIC_LABELS = {"top1": "top-1", "embedding_cosine": "embedding cosine to the teacher"}


def metric_label(metric: str | None) -> str:
    """What a summary's ``compressed_top1`` measures, in words (``metric``: absent = top-1)."""
    return METRIC_LABELS.get(metric or "top1", metric or "top-1")


def plot_front(rows: list[dict], path: str | Path, teacher_top1: float | None = None, title: str = "",
               metric: str | None = None) -> Path:
    """Accuracy vs packed bytes (log scale), one marker per series (default: method), the
    Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pP*X"
    group = lambda r: r.get("series") or r["method"]  # noqa: E731
    for i, method in enumerate(dict.fromkeys(group(r) for r in rows)):
        pts = [r for r in rows if group(r) == method]
        ax.scatter([r["packed_bytes"] for r in pts], [r["top1"] for r in pts], marker=markers[i % len(markers)],
                   label=method, zorder=3)
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["packed_bytes"])
    if front:
        ax.step([r["packed_bytes"] for r in front], [r["top1"] for r in front], where="post", color="black", lw=1,
                alpha=0.6, label="Pareto front")
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="grey", ls="--", label=f"teacher {teacher_top1:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel("packed file (bytes, log scale)")
    ax.set_ylabel(f"{metric_label(metric)} from the packed file (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "accuracy vs size")
    return _save(fig, path)


def weight_values(weights) -> dict:
    """How many distinct values the weights take, network-wide, and the entropy of their
    distribution in bits per weight (what weight sharing and entropy coding exploit)."""
    import torch

    flat = torch.cat([w.detach().reshape(-1).float().cpu() for w in weights]) if weights else torch.zeros(0)
    if flat.numel() == 0:
        return {"weights": 0, "unique_values": 0, "entropy_bits": 0.0}
    _, counts = torch.unique(flat, return_counts=True)
    p = counts.double() / flat.numel()
    return {"weights": flat.numel(), "unique_values": int(counts.numel()),
            "entropy_bits": float(-(p * p.log2()).sum())}


def text_table(rows: list[dict]) -> str:
    """Rows as an aligned plain-text table (the command line's)."""
    if not rows:
        return "(empty)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line([cell(r.get(c)) for c in cols]) for r in rows])


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """Rows as a Markdown table (Prefect artifacts, front.md)."""
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else ""
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows])
