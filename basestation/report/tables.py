"""The report's tables: one definition per table, written as CSV and shown in the HTML.

A :class:`Table` holds raw values (CSV keeps full precision, HTML formats
them by column kind). All tables carry a ``run`` column so several runs share
one file::

    >>> table = rounds_table([run])
    >>> write_csv(table, out_dir / "rounds.csv")
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from basestation.report import metrics
from basestation.report.data import RunData, finite, natural_key

# Column kinds decide HTML formatting: text, int, float, acc (accuracy in [0, 1]),
# j (joules), pct (percent), bool.
KINDS = ("text", "int", "float", "acc", "j", "pct", "bool")


@dataclass(frozen=True)
class Column:
    """A column's CSV name, its heading in the HTML and how to format it."""

    name: str
    heading: str
    kind: str = "text"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Table:
    """Named columns and rows of raw values (None for a missing value)."""

    name: str
    columns: list[Column]
    rows: list[list]

    def where(self, name: str, value) -> "Table":
        """The rows whose column ``name`` equals ``value`` (e.g. one run's rows)."""
        index = [c.name for c in self.columns].index(name)
        return Table(self.name, self.columns, [row for row in self.rows if row[index] == value])

    def without(self, *names: str) -> "Table":
        """The table without the named columns (the run column inside a run's own section)."""
        keep = [i for i, c in enumerate(self.columns) if c.name not in names]
        return Table(self.name, [self.columns[i] for i in keep], [[row[i] for i in keep] for row in self.rows])


def csv_value(value) -> str:
    """A value as CSV text: floats round-trip exactly, None and NaN are empty, booleans are true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_csv(table: Table, path: Path) -> Path:
    """Write ``table`` to ``path`` as CSV with a header line; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([c.name for c in table.columns])
        for row in table.rows:
            writer.writerow([csv_value(v) for v in row])
    return path


def rounds_table(runs: list[RunData]) -> Table:
    """One row per stored round: accuracy, precision, devices, and measured energy."""
    columns = [Column("run", "run"), Column("round", "round", "int"), Column("accuracy", "accuracy", "acc"),
               Column("loss", "loss", "float"), Column("bits_n", "n", "int"), Column("bits_m", "m", "int"),
               Column("devices_selected", "selected", "int"), Column("devices_answered", "answered", "int"),
               Column("seconds", "seconds", "float"), Column("measured_j", "measured energy", "j"),
               Column("cumulative_j", "cumulative energy", "j")]
    rows = []
    for run in runs:
        per_round = metrics.energy_by_round(run)
        cumulative = dict(metrics.cumulative_energy(run))
        for r in run.sorted_rounds():
            rows.append([run.name, r.round, r.accuracy, r.loss, r.bits_n, r.bits_m, r.devices_selected,
                         r.devices_answered, r.seconds, per_round.get(r.round, 0.0), cumulative[r.round]])
    return Table("rounds", columns, rows)


def energy_table(runs: list[RunData]) -> Table:
    """Every stored energy report with its modelled energy and errors."""
    columns = [Column("run", "run"), Column("device", "device"), Column("round", "round", "int"),
               Column("phase", "phase"), Column("joules", "measured", "j"),
               Column("joules_above_idle", "above idle", "j"), Column("seconds", "seconds", "float"),
               Column("samples", "samples", "int"), Column("partial", "partial", "bool"),
               Column("model_joules", "model", "j"), Column("calibrated_joules", "calibrated", "j"),
               Column("error_model_pct", "error before", "pct"),
               Column("error_calibrated_pct", "error after", "pct")]
    rows = []
    for run in runs:
        for r in sorted(run.energy, key=lambda r: (r.round, natural_key(r.device), r.phase)):
            rows.append([run.name, r.device, r.round, r.phase, r.joules, r.joules_above_idle, r.seconds,
                         r.samples, r.partial, r.model_joules, r.calibrated_joules,
                         metrics.ape(r, r.model_joules), metrics.ape(r, r.calibrated_joules)])
    return Table("energy", columns, rows)


def errors_table(runs: list[RunData]) -> Table:
    """Measured beside modelled energy with MAPE, per phase, per device and over the whole run."""
    columns = [Column("run", "run"), Column("group", "by"), Column("key", "phase / device"),
               Column("records", "reports", "int"), Column("measured_j", "measured above idle", "j"),
               Column("with_model", "with model", "int"), Column("model_j", "model", "j"),
               Column("with_calibrated", "with calibration", "int"), Column("calibrated_j", "calibrated", "j"),
               Column("mape_model_pct", "MAPE before", "pct"),
               Column("mape_calibrated_pct", "MAPE after", "pct"),
               Column("wape_model_pct", "WAPE before", "pct"),
               Column("wape_calibrated_pct", "WAPE after", "pct")]
    rows = []
    for run in runs:
        if not run.energy:
            continue
        groups = [("all", metrics.overall_error(run))]
        groups += [("phase", g) for g in metrics.errors_by(run, "phase")]
        groups += [("device", g) for g in metrics.errors_by(run, "device")]
        for kind, g in groups:
            rows.append([run.name, kind, g.key, g.records, g.measured_j, g.with_model, g.model_j,
                         g.with_calibrated, g.calibrated_j, g.mape_model, g.mape_calibrated, g.wape_model,
                         g.wape_calibrated])
    return Table("errors", columns, rows)


def ground_truth_table(runs: list[RunData]) -> Table:
    """Per device, measured energy against the emulator's ground-truth log."""
    columns = [Column("run", "run"), Column("device", "device"), Column("measured_j", "measured", "j"),
               Column("ground_truth_j", "ground truth", "j"),
               Column("difference_pct", "difference", "pct")]
    rows = [[run.name, t.device, t.measured_j, t.ground_truth_j, t.difference_pct]
            for run in runs for t in metrics.ground_truth_agreement(run)]
    return Table("ground_truth", columns, rows)


def comparison_table(table: list[metrics.Comparison]) -> Table:
    """The comparison of runs: energy to the target accuracy and the saving against the baseline."""
    columns = [Column("run", "run"), Column("baseline", "baseline", "bool"), Column("rounds", "rounds", "int"),
               Column("final_accuracy", "final accuracy", "acc"),
               Column("best_accuracy", "best accuracy", "acc"),
               Column("total_measured_j", "total measured energy", "j"),
               Column("target_accuracy", "target", "acc"), Column("reached", "reached", "bool"),
               Column("target_round", "round reached", "int"),
               Column("energy_to_target_j", "energy to target", "j"),
               Column("saving_pct", "saving vs baseline", "pct")]
    rows = [[c.name, c.is_baseline, c.rounds, c.final_accuracy, c.best_accuracy, c.total_j, c.target.target,
             c.target.reached, c.target.round, c.target.joules, c.saving_pct] for c in table]
    return Table("comparison", columns, rows)


def decisions_table(runs: list[RunData]) -> Table:
    """The solver's decisions as stored; columns are the union of their keys, nested values as JSON."""
    keys: list[str] = []
    for run in runs:
        for decision in run.decisions:
            keys += [k for k in decision if k not in keys]
    columns = [Column("run", "run")] + [Column(k, k, _kind_of(runs, k)) for k in keys]
    rows = []
    for run in runs:
        for decision in run.decisions:
            rows.append([run.name] + [_plain(decision.get(k)) for k in keys])
    return Table("decisions", columns, rows)


def rejections_table(runs: list[RunData]) -> Table:
    """What the basestation refused or dropped, with the reason it stored (bounds, screening, signatures...)."""
    columns = [Column("run", "run"), Column("round", "round", "int"), Column("device", "device"),
               Column("kind", "message"), Column("reason", "reason"), Column("detail", "detail")]
    rows = [[run.name] + [r.get(c.name) for c in columns[1:]] for run in runs for r in run.rejections]
    return Table("rejections", columns, rows)


def _kind_of(runs: list[RunData], key: str) -> str:
    values = [d.get(key) for run in runs for d in run.decisions if d.get(key) is not None]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float"
    return "text"


def _plain(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def format_value(value, kind: str) -> str:
    """A value as the HTML shows it (None and NaN as an en dash)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2013"
    if kind == "bool" or isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "int":
        return f"{int(value)}"
    if kind == "acc":
        return f"{float(value):.4f}"
    if kind == "j":
        return format_joules(float(value))
    if kind == "pct":
        return f"{float(value):.1f}%"
    if kind == "float":
        return f"{float(value):.4g}"
    return str(value)


def count_of(number: int, noun: str) -> str:
    """``3, "round"`` -> ``"3 rounds"``; ``1, "round"`` -> ``"1 round"``."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def format_joules(value: float) -> str:
    """Energy with a readable unit: ``1234.5`` -> ``"1.234 kJ"``, ``0.0021`` -> ``"2.1 mJ"``."""
    if not finite(value):
        return "\u2013"
    size = abs(value)
    for scale, unit in ((1e3, "kJ"), (1.0, "J"), (1e-3, "mJ"), (1e-6, "\u00b5J"), (1e-9, "nJ")):
        if size >= scale:
            return f"{value / scale:.4g} {unit}"
    return "0 J" if value == 0 else f"{value:.3g} J"
