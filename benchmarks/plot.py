"""PNG plot of a run: speedup over eager per case and peer, one panel per mode. matplotlib is optional."""
from __future__ import annotations

from pathlib import Path

from peers import EAGER
from results import RunResults


def plot_speedups(run: RunResults, path: Path) -> str:
    """Writes the plot to path; returns a one-line note saying where it went, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not available"

    peers = [p for p in run.peers if p != EAGER]
    labels = [cr.case.label for cr in run.cases]
    fig, axes = plt.subplots(len(run.modes), 1, figsize=(max(6.0, 1.2 * len(labels) + 2), 3.2 * len(run.modes)),
                             squeeze=False)
    width = 0.8 / max(1, len(peers))
    for ax, mode in zip(axes[:, 0], run.modes):
        top = 1.0
        for j, peer in enumerate(peers):
            xs, ys = [], []
            for i, cr in enumerate(run.cases):
                s = run.speedup(cr, mode, peer, EAGER)
                if s is not None:
                    xs.append(i + (j - (len(peers) - 1) / 2) * width)
                    ys.append(s)
            top = max([top] + ys)
            bars = ax.bar(xs, ys, width, label=peer)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(top=top * 2.0)  # room for the bar labels
        ax.set_ylabel(f"speedup vs {EAGER}")
        ax.set_title(mode)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"bnfused vs peers: {run.meta['device']} ({run.meta['threads'].split()[0]} threads, "
                 f"torch {run.meta['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path.name}"
