"""The report's figures, drawn with matplotlib's Agg renderer from :class:`RunData`.

Each function returns a :class:`matplotlib.figure.Figure`, or None when the
run has nothing to draw (the report then says why in words).
:func:`render_png` turns a figure into PNG bytes. No pyplot state is used, so
drawing is safe inside a long-running process and needs no display::

    >>> fig = accuracy_figure(run)
    >>> png = render_png(fig) if fig is not None else None
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from basestation.report import metrics
from basestation.report.data import RunData, finite, natural_key

MEASURED = "#1f4e79"
MODEL = "#d9822b"
CALIBRATED = "#2e8b57"
TRUTH = "#7b3294"
RUN_COLOURS = ["#1f4e79", "#d9822b", "#2e8b57", "#b2182b", "#7b3294", "#8c6d31", "#4d4d4d", "#17becf"]

WIDTH_IN = 9.0
DPI = 100


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no metadata, so the bytes depend only on the drawing)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _new(height_in: float, rows: int = 1, cols: int = 1, **kwargs) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def _maybe_log(ax, values: list[float]) -> None:
    """Use a log axis when the positive values span more than two decades (model vs board energy often do)."""
    positive = [v for v in values if finite(v) and v > 0]
    if len(positive) >= 2 and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def accuracy_figure(run: RunData) -> Figure | None:
    """Test accuracy against round (left) and against cumulative measured energy (right)."""
    rounds = run.sorted_rounds()
    if not rounds:
        return None
    cumulative = dict(metrics.cumulative_energy(run))
    x_round = [r.round for r in rounds]
    accuracy = [r.accuracy for r in rounds]
    energy = [cumulative[r.round] for r in rounds]
    fig, axes = _new(3.4, 1, 2, sharey=True)
    left, right = axes[0]
    left.plot(x_round, accuracy, marker="o", markersize=3, color=MEASURED)
    left.set_xlabel("round")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("test accuracy")
    left.set_title("Accuracy per round")
    right.plot(energy, accuracy, marker="o", markersize=3, color=MEASURED)
    right.set_xlabel("cumulative measured energy (J)")
    right.set_title("Accuracy against measured energy")
    return fig


def energy_rounds_figure(run: RunData) -> Figure | None:
    """Energy per round, measured beside modelled (top), and the modelling error per round (bottom)."""
    if not run.energy:
        return None
    groups = sorted(metrics.errors_by(run, "round"), key=lambda g: int(g.key))
    x = [int(g.key) for g in groups]
    fig, axes = _new(5.6, 2, 1, sharex=True)
    top, bottom = axes[:, 0]
    top.plot(x, [g.measured_j for g in groups], marker="o", markersize=3, color=MEASURED,
             label="measured above idle")
    series = [g.measured_j for g in groups]
    for attr, count, colour, label in (("model_j", "with_model", MODEL, "model (before calibration)"),
                                       ("calibrated_j", "with_calibrated", CALIBRATED, "model (after calibration)")):
        # a round's sum is comparable with the measured sum only when every phase of the round is predicted
        values = [getattr(g, attr) if getattr(g, count) == g.records else None for g in groups]
        if any(finite(v) for v in values):
            ys = [v if finite(v) else np.nan for v in values]
            top.plot(x, ys, marker="s", markersize=3, linestyle="--", color=colour, label=label)
            series += [v for v in values if finite(v)]
    _maybe_log(top, series)
    top.set_ylabel("energy per round (J)")
    top.set_title("Energy per round, all devices and phases")
    _legend_right(top)
    plotted = []
    for attr, colour, style, label in (("mape_model", MODEL, "-", "MAPE before calibration"),
                                       ("mape_calibrated", CALIBRATED, "-", "MAPE after calibration"),
                                       ("wape_model", MODEL, ":", "WAPE before calibration"),
                                       ("wape_calibrated", CALIBRATED, ":", "WAPE after calibration")):
        values = [getattr(g, attr) for g in groups]
        if any(finite(v) for v in values):
            bottom.plot(x, [v if finite(v) else np.nan for v in values], marker="o", markersize=3,
                        color=colour, linestyle=style, label=label)
            plotted += [v for v in values if finite(v)]
    _maybe_log(bottom, plotted)
    if plotted:
        _legend_right(bottom)
    else:
        bottom.text(0.5, 0.5, "no modelled energy stored", transform=bottom.transAxes,
                    ha="center", va="center", color="#666666")
    bottom.set_ylabel("error (%)")
    bottom.set_xlabel("round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_title("Modelling error per round (MAPE and energy-weighted WAPE)")
    return fig


def energy_devices_figure(run: RunData) -> Figure | None:
    """Per phase, each device's measured energy beside the model; and measured against ground truth."""
    if not run.energy:
        return None
    phases = sorted({r.phase for r in run.energy})
    devices = sorted({r.device for r in run.energy} | set(run.ground_truth_j or {}), key=natural_key)
    truth = metrics.ground_truth_agreement(run)
    rows = len(phases) + (1 if truth else 0)
    fig, axes = _new(2.8 * rows + 0.4, rows, 1)
    x = np.arange(len(devices))
    width = 0.27
    for ax, phase in zip(axes[:, 0], phases):
        records, span = _comparable([r for r in run.energy if r.phase == phase])
        by_device = {g.key: g for g in metrics.group_errors(records, "device")}
        values = []
        for offset, attr, colour, label in ((-width, "measured_j", MEASURED, "measured above idle"),
                                            (0.0, "model_j", MODEL, "model (before calibration)"),
                                            (width, "calibrated_j", CALIBRATED, "model (after calibration)")):
            heights = [getattr(by_device[d], attr) if d in by_device else None for d in devices]
            if not any(finite(h) for h in heights):
                continue
            ax.bar(x + offset, [h if finite(h) else 0.0 for h in heights], width, color=colour, label=label)
            values += [h for h in heights if finite(h)]
        _maybe_log(ax, values)
        ax.set_title(f"Phase '{phase}': energy per device over {span}")
        ax.set_ylabel("energy (J)")
        _device_ticks(ax, x, devices)
        _legend_right(ax)
    if truth:
        ax = axes[-1, 0]
        by_device = {t.device: t for t in truth}
        ax.bar(x - width / 2, [by_device[d].measured_j if d in by_device else 0.0 for d in devices], width,
               color=MEASURED, label="measured (meter reader, whole board)")
        ax.bar(x + width / 2, [(by_device[d].ground_truth_j or 0.0) if d in by_device else 0.0 for d in devices],
               width, color=TRUTH, label="ground truth (emulator log)")
        ax.set_title("Measured energy against the emulator's ground truth, per device")
        ax.set_ylabel("energy (J)")
        _device_ticks(ax, x, devices)
        _legend_right(ax)
    return fig


def _comparable(records: list) -> tuple[list, str]:
    """The records every bar can cover, and how to say so: those with a calibrated prediction when any
    have one, else those with a model prediction, else all."""
    for attr, what in (("calibrated_joules", "with a calibrated model"), ("model_joules", "with a modelled energy")):
        subset = [r for r in records if finite(getattr(r, attr))]
        if subset and len(subset) < len(records):
            rounds = len({r.round for r in subset})
            return subset, f"the {rounds} round{'s' if rounds != 1 else ''} {what}"
        if subset:
            return subset, "all rounds"
    return records, "all rounds"


def _device_ticks(ax, x: np.ndarray, devices: list[str]) -> None:
    """Device names under the bars; with many devices, vertical and only every k-th one."""
    if len(devices) <= 8:
        ax.set_xticks(x, devices)
        return
    every = max(1, math.ceil(len(devices) / 25))
    ax.set_xticks(x[::every], devices[::every], rotation=90, fontsize="small")


def _legend_right(ax) -> None:
    """A legend beside the axes, where it cannot hide bars (constrained layout makes room)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def precision_figure(run: RunData) -> Figure | None:
    """The precision trajectory: training bits n and uplink bits m per round."""
    rounds = run.sorted_rounds()
    if not rounds:
        return None
    x = [r.round for r in rounds]
    fig, axes = _new(3.0)
    ax = axes[0, 0]
    ax.step(x, [r.bits_n for r in rounds], where="post", marker="o", markersize=3, color=MEASURED,
            label="n (training bits)")
    ax.step(x, [r.bits_m for r in rounds], where="post", marker="s", markersize=3, color=MODEL,
            linestyle="--", label="m (uplink bits)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("bits")
    ax.set_ylim(0, 33)
    ax.set_yticks([1, 4, 8, 12, 16, 20, 24, 28, 32])
    ax.set_title("Precision per round")
    _legend_right(ax)
    return fig


def comparison_accuracy_figure(runs: list[RunData], target: float) -> Figure | None:
    """Accuracy against cumulative measured energy for every run, with the target as a line."""
    drawable = [run for run in runs if run.rounds]
    if not drawable:
        return None
    fig, axes = _new(3.8)
    ax = axes[0, 0]
    for i, run in enumerate(drawable):
        cumulative = dict(metrics.cumulative_energy(run))
        rounds = run.sorted_rounds()
        ax.plot([cumulative[r.round] for r in rounds], [r.accuracy for r in rounds], marker="o", markersize=3,
                color=RUN_COLOURS[i % len(RUN_COLOURS)], label=run.name)
    ax.axhline(target, color="#999999", linestyle=":", label=f"target {target:g}")
    ax.set_xlabel("cumulative measured energy (J)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against measured energy, all runs")
    ax.legend(loc="best", fontsize="small")
    return fig


def comparison_target_figure(table: list[metrics.Comparison]) -> Figure | None:
    """Measured energy each run needed to reach the target; runs that never did are marked."""
    if not table:
        return None
    fig, axes = _new(3.4)
    ax = axes[0, 0]
    names = [row.name for row in table]
    reached = [row.target.joules if row.target.reached else 0.0 for row in table]
    x = np.arange(len(names))
    bars = ax.bar(x, reached, 0.6, color=[RUN_COLOURS[i % len(RUN_COLOURS)] for i in range(len(names))])
    top = max(reached) if any(reached) else 1.0
    for bar, row in zip(bars, table):
        label = "not reached" if not row.target.reached else f"{row.target.joules:.4g} J"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02 * top, label,
                ha="center", va="bottom", fontsize="small")
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x, names)
    ax.set_ylabel("energy to target (J)")
    ax.set_title(f"Measured energy to reach accuracy {table[0].target.target:g}")
    return fig
