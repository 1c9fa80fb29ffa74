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
