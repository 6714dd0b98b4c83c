"""Figure of total energy and rounds against training precision, for ``qfl solve --plot``.

Imports matplotlib (Agg backend) only when called, so the solver itself does
not need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from basestation.energy.problem import Setting


def plot_formats() -> set[str]:
    """File extensions (without the dot) matplotlib can write a figure as."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot_precision(curve: Sequence[Setting], path: str | Path, *, optimum: Setting, baseline: Setting,
                   title: str) -> None:
    """Write a two-panel PNG: energy (log scale) and rounds of ``curve`` against n, optimum and baseline marked.

    ``curve`` holds one setting per training precision (for the joint search,
    the best (I, K, m) at each n).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = [s.n for s in curve]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 6.0), constrained_layout=True)
    top.plot(n, [s.energy_j for s in curve], marker="o", ms=3, label="least energy at this n")
    top.set_yscale("log")
    top.set_ylabel("total energy (J)")
    bottom.plot(n, [s.rounds for s in curve], marker="o", ms=3, color="tab:orange")
    bottom.set_ylabel("rounds to target")
    bottom.set_xlabel("training precision n (bits)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, key in ((top, "energy_j"), (bottom, "rounds")):
        ax.scatter([optimum.n], [getattr(optimum, key)], marker="*", s=140, color="tab:green", zorder=3,
                   label=f"optimum (I={optimum.I}, K={optimum.K}, m={optimum.m}, n={optimum.n})")
        ax.scatter([baseline.n], [getattr(baseline, key)], marker="s", s=50, color="tab:red", zorder=3,
                   label=f"32-bit baseline (I={baseline.I}, K={baseline.K})")
        ax.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    top.set_title(title, fontsize=10)
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
