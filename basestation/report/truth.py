"""The emulated meters' ground truth: the power each emulator really simulated, integrated over the phases.

Each meter emulator (``qfl meter emulate --ground-truth FILE.csv``) logs the
board power it computed, one row per sample with the host's wall-clock time.
The report integrates that power (trapezoid rule, interpolated at the edges)
over the same wall-clock intervals the device's meter reader measured, so the
two numbers describe the same energy and their difference is the reader's
error (sampling, clock alignment, register quantization).

    >>> trace = read_trace(Path("runs/x/ground-truth/pi-0.csv"))
    >>> energy_between(trace, 1700000000.0, 1700000002.5)      # joules in those 2.5 s
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basestation.report.data import ReportError

TIME_COLUMNS = ("wall_time_s", "time_s", "unix_time", "timestamp", "t")
POWER_COLUMNS = ("power_w", "watts", "p_w")


@dataclass(frozen=True)
class PhaseWindow:
    """A measured phase of one device as a wall-clock interval (seconds since the epoch)."""

    device: str
    round: int
    phase: str
    start: float
    end: float


@dataclass(frozen=True)
class Trace:
    """A power log: times in seconds (increasing) and watts."""

    times: np.ndarray
    watts: np.ndarray


def read_trace(path: Path) -> Trace:
    """Read a ground-truth CSV (a header naming a time and a power column; see ``TIME_COLUMNS``)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"ground-truth log {path} is not readable CSV: {exc}") from None
    t_col = next((header.index(c) for c in TIME_COLUMNS if c in header), None)
    p_col = next((header.index(c) for c in POWER_COLUMNS if c in header), None)
    if t_col is None or p_col is None:
        raise ReportError(f"ground-truth log {path} needs a time column ({' or '.join(TIME_COLUMNS)}) and a "
                          f"power column ({' or '.join(POWER_COLUMNS)}); its header is {','.join(header)!r}")
    times, watts = [], []
    for number, row in enumerate(rows, start=2):
        if not row:
            continue
        try:
            t, p = float(row[t_col]), float(row[p_col])
        except (IndexError, ValueError):
            raise ReportError(f"ground-truth log {path} line {number}: expected numbers in columns "
                              f"{header[t_col]!r} and {header[p_col]!r}, got {row!r}") from None
        if math.isfinite(t) and math.isfinite(p):
            times.append(t)
            watts.append(p)
    order = np.argsort(np.asarray(times), kind="stable")
    return Trace(np.asarray(times, dtype=float)[order], np.asarray(watts, dtype=float)[order])


def energy_between(trace: Trace, start: float, end: float) -> float:
    """Joules in ``[start, end]``: trapezoid rule on the samples, power interpolated at both edges.

    Only the part of the interval the log covers counts.
    """
    t, p = trace.times, trace.watts
    if len(t) < 2 or end <= start:
        return 0.0
    lo, hi = max(start, t[0]), min(end, t[-1])
    if hi <= lo:
        return 0.0
    inside = (t > lo) & (t < hi)
    ts = np.concatenate(([lo], t[inside], [hi]))
    ps = np.interp(ts, t, p)
    return float(np.sum((ps[1:] + ps[:-1]) * np.diff(ts)) / 2.0)


def covered(trace: Trace, window: PhaseWindow) -> bool:
    """True when the log spans the whole window."""
    return len(trace.times) >= 2 and trace.times[0] <= window.start and window.end <= trace.times[-1]


def find_ground_truth(run_dir: Path, summary: dict) -> dict[str, Path]:
    """device -> ground-truth CSV: the mapping ``summary.json`` gives under ``"ground_truth"``, else the
    files ``ground-truth/DEVICE.csv`` of the run directory."""
    named = summary.get("ground_truth")
    if isinstance(named, dict):
        return {str(device): (run_dir / str(p)) if not Path(str(p)).is_absolute() else Path(str(p))
                for device, p in named.items()}
    folder = run_dir / "ground-truth"
    return {p.stem: p for p in sorted(folder.glob("*.csv"))} if folder.is_dir() else {}


def ground_truth_energy(logs: dict[str, Path], windows: list[PhaseWindow],
                        measured_phases: dict[str, int]) -> tuple[dict[str, float] | None, list[str]]:
    """Per device, the ground-truth joules over that device's measured phase windows, and notes.

    ``measured_phases`` counts the energy phases the report holds per device;
    a device is compared only when every one of them has a window. A device
    whose log is missing, whose phases lack times, or whose log does not
    cover them all is left out with a note saying why.
    """
    notes: list[str] = []
    by_device: dict[str, list[PhaseWindow]] = {}
    for w in windows:
        by_device.setdefault(w.device, []).append(w)
    result: dict[str, float] = {}
    for device, path in sorted(logs.items()):
        if not path.is_file():
            notes.append(f"The ground-truth log of {device} ({path}) does not exist.")
            continue
        mine = by_device.get(device, [])
        if len(mine) < measured_phases.get(device, 0) or not mine:
            notes.append(f"{measured_phases.get(device, 0) - len(mine)} of the {measured_phases.get(device, 0)} "
                         f"measured phases of {device} carry no start and end times, so its ground-truth log "
                         "cannot be matched to them.")
            continue
        trace = read_trace(path)
        short = [w for w in mine if not covered(trace, w)]
        if short:
            notes.append(f"The ground-truth log of {device} does not cover {len(short)} of its {len(mine)} "
                         "measured phases; its comparison is left out.")
            continue
        result[device] = math.fsum(energy_between(trace, w.start, w.end) for w in mine)
    return (result if result else None), notes
