"""PNG plot of a run, one row per mode: every peer's absolute median time with IQR whiskers (left) beside its
speedup over eager (right). A bar from a noisy measurement (measure.NOISY_SPREAD) is drawn hatched and labelled
"noisy" instead of with its number, and does not stretch the axis. matplotlib is optional."""
from __future__ import annotations

from pathlib import Path

from .peers import EAGER
from .results import RunResults


def _bar_x(i: int, j: int, n: int, width: float) -> float:
    return i + (j - (n - 1) / 2) * width


def _draw_bars(ax, xs, ys, noisy, width, label, color, labels, yerr=None):
    """Bars at xs (hatched and pale where noisy), labelled with `labels` (or "noisy")."""
    if not xs:
        return
    bars = ax.bar(xs, ys, width, label=label, color=color, yerr=yerr, capsize=2 if yerr is not None else 0,
                  error_kw={"elinewidth": 0.8})
    for bar, bad in zip(bars, noisy):
        if bad:
            bar.set_alpha(0.35)
            bar.set_hatch("//")
    ax.bar_label(bars, labels=["noisy" if bad else text for bad, text in zip(noisy, labels)], fontsize=6,
                 padding=2)


def _time_panel(ax, run: RunResults, mode: str, labels: list[str], width: float, colors: dict) -> None:
    ax.set_title(f"{mode}: time", fontsize=9)
    top, bottom = 0.0, float("inf")
    for j, peer in enumerate(run.peers):
        xs, ys, lo, hi, noisy, text = [], [], [], [], [], []
        for i, cr in enumerate(run.cases):
            t = cr.timings.get((mode, peer))
            if t is None:
                continue
            ms, half_iqr = t.median * 1e3, t.iqr * 1e3 / 2
            xs.append(_bar_x(i, j, len(run.peers), width))
            ys.append(ms)
            lo.append(min(half_iqr, ms * 0.99))  # log axis: the whisker stays above zero
            hi.append(half_iqr)
            noisy.append(t.noisy)
            text.append(f"{ms:.3g}")
            if not t.noisy:
                top, bottom = max(top, ms + half_iqr), min(bottom, ms)
        _draw_bars(ax, xs, ys, noisy, width, peer, colors[peer], text, yerr=[lo, hi])
    ax.set_yscale("log")
    if top > 0:
        ax.set_ylim(bottom=bottom / 3.0, top=top * 3.0)  # room for the bar labels
    ax.set_ylabel("median ms (IQR whiskers)")


def _speedup_panel(ax, run: RunResults, mode: str, labels: list[str], width: float, colors: dict) -> None:
    ax.set_title(f"{mode}: speedup", fontsize=9)
    peers = [p for p in run.peers if p != EAGER]
    top = 1.0
    for j, peer in enumerate(peers):
        xs, ys, noisy, text = [], [], [], []
        for i, cr in enumerate(run.cases):
            s = run.speedup(cr, mode, peer, EAGER)
            if s is None:
                continue
            bad = cr.timings[(mode, peer)].noisy or cr.timings[(mode, EAGER)].noisy
            xs.append(_bar_x(i, j, len(peers), width))
            ys.append(s)
            noisy.append(bad)
            text.append(f"{s:.1f}")
            if not bad:
                top = max(top, s)
        _draw_bars(ax, xs, ys, noisy, width, peer, colors[peer], text)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 2.0)  # room for the labels; a noisy bar beyond it is cut, not trusted
    ax.set_ylabel(f"speedup vs {EAGER}")


def plot_speedups(run: RunResults, path: Path) -> str:
    """Writes the plot to path; returns a one-line note saying where it went, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not available"

    labels = [cr.case.label for cr in run.cases]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {peer: cycle[k % len(cycle)] for k, peer in enumerate(run.peers)}  # same colour in both panels
    panel_w = max(5.0, 0.9 * len(labels) + 2)
    fig, axes = plt.subplots(len(run.modes), 2, figsize=(2 * panel_w, 3.4 * len(run.modes)), squeeze=False)
    for row, mode in enumerate(run.modes):
        _time_panel(axes[row, 0], run, mode, labels, 0.8 / max(1, len(run.peers)), colors)
        _speedup_panel(axes[row, 1], run, mode, labels, 0.8 / max(1, len(run.peers) - 1), colors)
        for ax in axes[row]:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    # Legend from plain patches: a panel's first bar of a peer may be a hatched noisy one.
    from matplotlib.patches import Patch
    axes[0, 0].legend(handles=[Patch(color=colors[p], label=p) for p in run.peers], fontsize=7)
    axes[0, 1].legend(handles=[Patch(color=colors[p], label=p) for p in run.peers if p != EAGER], fontsize=7)
    fig.suptitle(f"bnfused vs peers: {run.meta['device']} ({run.meta['threads'].split()[0]} threads, "
                 f"torch {run.meta['torch']}); hatched = noisy measurement (rounds disagree), not trusted",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path.name}"
