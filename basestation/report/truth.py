"""The emulated meters' ground truth, integrated over exactly the phases the devices measured.

Each meter emulator (``qfl meter emulate --ground-truth FILE.csv``) logs the
true board power it simulated against the host's ``time.monotonic()``
(``firmware_tools.emulator.truth``). A device's energy report gives each
phase's ``start`` and ``end`` on that same clock and the ``gaps`` the meter
missed, whose energy the measured figure leaves out. Integrating the true
power over the phase minus its gaps therefore gives the number the measured
joules should equal; the difference is the meter reader's error (sampling,
clock alignment, register quantization).

    >>> logs = find_ground_truth(Path("runs/x"), summary={})      # {"pi-0": Path("runs/x/ground-truth/pi-0.csv")}
    >>> truth, notes = ground_truth_energy(logs, windows, {"pi-0": 24})
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from basestation.report.data import ReportError


@dataclass(frozen=True)
class PhaseWindow:
    """A measured phase of one device on the host's monotonic clock, with the stretches it has no data for."""

    device: str
    round: int
    phase: str
    start: float
    end: float
    gaps: tuple[tuple[float, float], ...] = ()


def phase_windows(device: str, round_: int, report: dict) -> list[PhaseWindow]:
    """The windows of a raw energy report's phases (``meter.phases.<name>`` with ``start`` and ``end``)."""
    meter = report.get("meter")
    phases = meter.get("phases") if isinstance(meter, dict) else None
    if not isinstance(phases, dict):
        return []
    out = []
    for phase, figures in phases.items():
        if not isinstance(figures, dict):
            continue
        start, end = figures.get("start"), figures.get("end")
        if not (_number(start) and _number(end) and end >= start):
            continue
        gaps = tuple((float(g[0]), float(g[1])) for g in figures.get("gaps") or ()
                     if isinstance(g, (list, tuple)) and len(g) == 2 and _number(g[0]) and _number(g[1]))
        out.append(PhaseWindow(device, round_, str(phase), float(start), float(end), gaps))
    return out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    """Per device, the true joules over that device's measured phase windows (gaps left out), and notes.

    ``measured_phases`` counts the energy phases the report holds per device;
    a device is compared only when every one of them has a window. A device
    whose log is missing, whose phases lack times, or whose log does not
    cover them all is left out with a note saying why.
    """
    from firmware_tools.emulator.truth import read_ground_truth, truth_energy

    notes: list[str] = []
    by_device: dict[str, list[PhaseWindow]] = {}
    for w in windows:
        by_device.setdefault(w.device, []).append(w)
    result: dict[str, float] = {}
    for device, path in sorted(logs.items()):
        expected = measured_phases.get(device, 0)
        mine = by_device.get(device, [])
        if not path.is_file():
            notes.append(f"The ground-truth log of {device} ({path}) does not exist.")
            continue
        if not mine or len(mine) < expected:
            notes.append(f"{expected - len(mine)} of the {expected} measured phases of {device} carry no start and "
                         "end times, so its ground-truth log cannot be matched to them.")
            continue
        try:
            truth = read_ground_truth(path)
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot read the ground-truth log {path}: {exc}") from None
        times = truth["host_monotonic_s"]
        short = [w for w in mine if len(times) < 2 or w.start < times[0] or w.end > times[-1]]
        if short:
            notes.append(f"The ground-truth log of {device} does not cover {len(short)} of its {len(mine)} "
                         "measured phases; the device is left out of the comparison.")
            continue
        result[device] = math.fsum(truth_energy(truth, w.start, w.end, exclude=w.gaps) for w in mine)
    return (result if result else None), notes
