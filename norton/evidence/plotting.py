"""Figures written to files: matplotlib without a display."""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    """Lay out, write and release a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def accuracy_vs_macs_axes(ax, title: str, *, legend: str, fontsize: float) -> None:
    """Labels, grid and legend of an accuracy-vs-MACs plot."""
    ax.set_xlabel("MACs per image (millions, factored convention)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend)
