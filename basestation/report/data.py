"""The plain data a report is drawn from: rounds, energy records and runs.

The loader (:mod:`basestation.report.load`) fills these from a run directory;
tests and the testbed can also build them directly::

    >>> run = RunData(name="int8", path=Path("runs/int8"), config={},
    ...               rounds=[RoundRecord(1, 0.81, 0.62, 8, 8, 4, 4, 3.2)],
    ...               energy=[], decisions=[], ground_truth_j=None)
    >>> run.rounds[0].accuracy
    0.81
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path


class ReportError(ValueError):
    """A run directory or a report input that cannot be read; the message names what was expected."""


@dataclass(frozen=True)
class RoundRecord:
    """One finished round as the basestation stored it."""

    round: int
    accuracy: float
    loss: float
    bits_n: int
    bits_m: int
    devices_selected: int
    devices_answered: int
    seconds: float


@dataclass(frozen=True)
class EnergyRecord:
    """One device's measured energy for one phase of one round, with the model's prediction.

    ``model_joules`` is the analytic model before calibration and
    ``calibrated_joules`` the model with the fit the basestation had at that
    round; either is ``None`` when the basestation stored no prediction.
    """

    device: str
    round: int
    phase: str
    joules: float
    joules_above_idle: float
    seconds: float
    samples: int
    partial: bool
    model_joules: float | None = None
    calibrated_joules: float | None = None


@dataclass(frozen=True)
class RunData:
    """Everything the report shows about one run.

    ``ground_truth_j`` maps device to the energy its emulated meter's
    ground-truth log holds over the same intervals as the measured phases
    (``None`` for runs on real hardware). ``notes`` carries what the loader
    could not read, so the report can say so. ``rejections`` holds every
    message the basestation refused and every update it dropped from an
    aggregate (round, device, kind, reason, detail), oldest first.
    """

    name: str
    path: Path
    config: dict
    rounds: list[RoundRecord]
    energy: list[EnergyRecord]
    decisions: list[dict]
    ground_truth_j: dict[str, float] | None
    notes: list[str] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)

    def sorted_rounds(self) -> list[RoundRecord]:
        """The rounds in round order."""
        return sorted(self.rounds, key=lambda r: r.round)


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers inside names by value: ``pi-2`` before ``pi-10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def finite(value: float | None) -> bool:
    """True for a real, finite number (not ``None``, NaN or infinity)."""
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
