"""Write a whole report: figures as PNG, tables as CSV, and the self-contained report.html.

    >>> from basestation.report import load_run, write_report
    >>> files = write_report([load_run("runs/int8")], "runs/int8", target_accuracy=0.9)
    >>> files.html
    PosixPath('runs/int8/report.html')

A figure that fails to draw is replaced by a sentence saying so, so a report
written at the end of a long run is never lost to one bad plot.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from basestation.report import figures, metrics, tables
from basestation.report.data import ReportError, RunData, finite
from basestation.report.html import FigureImage, RunSection, render_page

TITLE = "qfl-testbed: measured and modelled energy"


@dataclass(frozen=True)
class ReportFiles:
    """The files a report consists of."""

    html: Path
    figures: list[Path]
    csv: list[Path]


# key -> (title, caption, why it can be empty, drawing function)
RUN_FIGURES: dict[str, tuple[str, str, str, Callable[[RunData], Figure | None]]] = {
    "accuracy": ("Accuracy", "Test accuracy of the global model after each round, against the round and against "
                 "the cumulative measured energy of all devices.",
                 "No rounds were recorded, so there is no accuracy to plot.", figures.accuracy_figure),
    "energy-rounds": ("Energy per round", "Measured energy above idle of all devices and phases in each round "
                      "beside the model before and after calibration (drawn for the rounds where every phase has a "
                      "prediction), and the modelling error per round.",
                      "No energy reports were stored, so there is no energy to plot.",
                      figures.energy_rounds_figure),
    "energy-devices": ("Energy per device and phase", "Each device's measured energy above idle in each phase "
                       "beside the model, summed over the rounds that have the predictions shown; with emulator "
                       "logs, the whole measured energy against ground truth.",
                       "No energy reports were stored, so there is no energy to plot.",
                       figures.energy_devices_figure),
    "precision": ("Precision trajectory", "Training precision n and uplink precision m used in each round.",
                  "No rounds were recorded, so there is no precision trajectory.", figures.precision_figure),
}


def slugify(name: str) -> str:
    """A file-name-safe form of a run name: ``"int 8/a"`` -> ``"int-8-a"``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "run"


def unique_names(names: list[str]) -> list[str]:
    """The names with repeats made distinct by a suffix: ``["a", "a"]`` -> ``["a", "a-2"]``."""
    used: set[str] = set()
    result = []
    for name in names:
        candidate, count = name, 1
        while candidate in used:
            count += 1
            candidate = f"{name}-{count}"
        used.add(candidate)
        result.append(candidate)
    return result


def draw_figure(key: str, title: str, caption: str, draw: Callable[[], Figure | None], empty: str, filename: str,
                figure_dir: Path) -> tuple[FigureImage | None, str | None]:
    """Draw one figure and save it as ``figure_dir/filename``; returns ``(image, None)`` or ``(None, why not)``.

    ``draw`` returning None means there is nothing to draw (the reason is
    ``empty``); an exception becomes a sentence naming it.
    """
    try:
        fig = draw()
        if fig is None:
            return None, empty
        png = figures.render_png(fig)
    except Exception as exc:  # one broken plot must not cost the whole report
        return None, f"This figure could not be drawn ({type(exc).__name__}: {exc})."
    _write_bytes(figure_dir / filename, png)
    return FigureImage(key=key, title=title, caption=caption, png=png, filename=filename), None


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unaggregated_note(run: RunData) -> str:
    """``", of which 1.2 J in round 5, never aggregated"`` for rounds cut short, else ``""``."""
    cut_short = metrics.unaggregated_energy(run)
    if not cut_short:
        return ""
    label = "round" if len(cut_short) == 1 else "rounds"
    return (f", of which {tables.format_joules(math.fsum(cut_short.values()))} in {label} "
            f"{metrics.round_ranges(sorted(cut_short))}, never aggregated")


def _summary(run: RunData, target: metrics.TargetResult) -> list[tuple[str, str]]:
    rounds = run.sorted_rounds()
    accuracies = [r.accuracy for r in rounds if finite(r.accuracy)]
    overall = metrics.overall_error(run)
    truth = [t.difference_pct for t in metrics.ground_truth_agreement(run) if t.difference_pct is not None]
    fmt = tables.format_value
    rows = [
        ("rounds", str(len(rounds))),
        ("final accuracy", fmt(accuracies[-1] if accuracies else None, "acc")),
        ("best accuracy", fmt(max(accuracies) if accuracies else None, "acc")),
        ("total measured energy", tables.format_joules(metrics.total_measured_j(run))
         + f" over {tables.count_of(len(run.energy), 'energy report')}" + _unaggregated_note(run)),
        ("of which above idle", tables.format_joules(
            math.fsum(r.joules_above_idle for r in run.energy if math.isfinite(r.joules_above_idle)))),
        ("devices", str(len({r.device for r in run.energy}))),
        ("MAPE before / after calibration",
         f"{fmt(overall.mape_model, 'pct')} / {fmt(overall.mape_calibrated, 'pct')}"),
        ("WAPE before / after calibration",
         f"{fmt(overall.wape_model, 'pct')} / {fmt(overall.wape_calibrated, 'pct')}"),
        (f"energy to accuracy {target.target:g}",
         f"{tables.format_joules(target.joules)} (round {target.round})" if target.reached else "not reached"),
    ]
    if truth:
        worst = max(truth, key=abs)
        rows.append(("measured vs ground truth", f"{len(truth)} devices, largest difference {worst:+.2f}%"))
    return rows


def write_report(runs: list[RunData], out_dir: str | Path, *, target_accuracy: float = 0.9,
                 baseline: str | None = None) -> ReportFiles:
    """Write report.html, figures/*.png and the CSV tables of ``runs`` into ``out_dir``.

    The first run (or the run named ``baseline``) is the baseline of the
    savings. Run names must be distinct; :func:`unique_names` makes them so.
    Raises :class:`ReportError` for no runs, repeated names, a bad target or
    an unknown baseline.
    """
    if not runs:
        raise ReportError("a report needs at least one run")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run names must be distinct, got {names}; rename them or use unique_names()")
    comparison = metrics.compare(runs, target_accuracy, baseline)
    out = Path(out_dir)
    figure_dir = out / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)

    all_tables = {t.name: t for t in (tables.rounds_table(runs), tables.energy_table(runs),
                                      tables.errors_table(runs), tables.ground_truth_table(runs),
                                      tables.comparison_table(comparison), tables.decisions_table(runs),
                                      tables.rejections_table(runs))}
    csv_paths = [tables.write_csv(t, out / f"{name}.csv") for name, t in all_tables.items()]
    sections = [_run_section(run, slug, row.target, all_tables, figure_dir)
                for run, slug, row in zip(runs, unique_names([slugify(r.name) for r in runs]), comparison)]
    comparison_images, comparison_missing = [], []
    if len(runs) > 1:
        for key, title, caption, draw in _comparison_figures(runs, target_accuracy, comparison):
            image, reason = draw_figure(key, title, caption, draw, f"{title}: nothing to draw.", f"{key}.png",
                                        figure_dir)
            if image is None:
                comparison_missing.append(reason)
            else:
                comparison_images.append(image)

    images = [image for section in sections for image in section.figures.values()] + comparison_images
    figure_paths = [figure_dir / image.filename for image in images]
    _remove_stale_figures(figure_dir, [s.slug for s in sections], {p.name for p in figure_paths})
    files = [p.name for p in csv_paths] + [f"figures/{p.name}" for p in figure_paths]
    page = render_page(title=TITLE, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       target=target_accuracy, sections=sections, comparison=all_tables["comparison"],
                       comparison_figures=comparison_images, comparison_missing=comparison_missing, files=files)
    html_path = out / "report.html"
    _write_bytes(html_path, page.encode("utf-8"))
    return ReportFiles(html=html_path, figures=figure_paths, csv=csv_paths)


def _run_section(run: RunData, slug: str, target: metrics.TargetResult, all_tables: dict[str, tables.Table],
                 figure_dir: Path) -> RunSection:
    """Draw one run's figures and gather what its part of the page shows."""
    drawn, missing = {}, {}
    for key, (title, caption, empty, draw) in RUN_FIGURES.items():
        image, reason = draw_figure(key, title, caption, lambda d=draw: d(run), empty, f"{slug}-{key}.png",
                                    figure_dir)
        if image is None:
            missing[key] = reason
        else:
            drawn[key] = image
    per_run = {name: t.where("run", run.name).without("run") for name, t in all_tables.items()}
    return RunSection(name=run.name, slug=slug, path=str(run.path), summary=_summary(run, target),
                      notes=metrics.run_notes(run), figures=drawn, missing=missing, tables=per_run,
                      config=run.config)


def _comparison_figures(runs: list[RunData], target: float, comparison: list[metrics.Comparison]) -> list[tuple]:
    return [("comparison-accuracy-energy", "Accuracy against energy, all runs",
             "Test accuracy against cumulative measured energy for each run; the dotted line is the target.",
             lambda: figures.comparison_accuracy_figure(runs, target)),
            ("comparison-energy-to-target", "Energy to the target accuracy",
             "Measured energy each run used until its first round at or above the target.",
             lambda: figures.comparison_target_figure(comparison))]


def _remove_stale_figures(figure_dir: Path, slugs: list[str], written: set[str]) -> None:
    """Delete figures an earlier report of the same runs left behind (e.g. a plot that has no data now)."""
    ours = {f"{slug}-{key}.png" for slug in slugs for key in RUN_FIGURES}
    ours |= {"comparison-accuracy-energy.png", "comparison-energy-to-target.png"}
    for name in sorted(ours - written):
        (figure_dir / name).unlink(missing_ok=True)
