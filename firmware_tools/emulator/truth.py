"""The emulator's ground-truth power log, and energy read back from it.

CSV with a header row and one row per emulated sample:
``host_monotonic_s,meter_s,power_w,current_a,voltage_v``. ``host_monotonic_s``
is the host's ``time.monotonic()`` at the instant the sample stands for (the
same clock the reader's phases use), ``meter_s`` the meter's clock for it
(empty while the meter is unplugged), the rest the true, unquantised power,
current and board voltage the emulator produced::

    truth = read_ground_truth("truth.csv")
    joules = truth_energy(truth, start, end, exclude=phase.gaps)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

HEADER = "host_monotonic_s,meter_s,power_w,current_a,voltage_v\n"


class GroundTruthLog:
    """Appends rows in batches; ``close()`` flushes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="ascii", buffering=1 << 16)
        self._file.write(HEADER)
        self.rows = 0

    def write(self, host: np.ndarray, meter: np.ndarray, power: np.ndarray, current: np.ndarray,
              voltage: np.ndarray) -> None:
        rows = [f"{h:.6f},{'' if math.isnan(m) else f'{m:.6f}'},{p:.5f},{i:.6f},{v:.5f}\n"
                for h, m, p, i, v in zip(host.tolist(), meter.tolist(), power.tolist(), current.tolist(),
                                         voltage.tolist())]
        self._file.write("".join(rows))
        self.rows += len(rows)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_ground_truth(path: str | Path) -> dict[str, np.ndarray]:
    """The log as columns of float arrays (an empty meter time reads as NaN)."""
    path = Path(path)
    with open(path, encoding="ascii") as f:
        header = f.readline()
        if header != HEADER:
            raise ValueError(f"{path} is not a ground-truth log: first line {header.strip()!r}")
        data = np.genfromtxt(f, delimiter=",", dtype=float, ndmin=2)
    if data.size == 0:
        data = np.empty((0, 5))
    names = HEADER.strip().split(",")
    return {name: data[:, i] for i, name in enumerate(names)}


def truth_energy(truth: dict[str, np.ndarray], start: float, end: float,
                 exclude: Sequence[tuple[float, float]] = ()) -> float:
    """True energy in joules over host times [start, end], leaving out the ``exclude`` intervals.

    Trapezoids between consecutive rows, clipped to the window; a trapezoid
    that overlaps an excluded interval is clipped to the parts outside it.
    """
    t = truth["host_monotonic_s"]
    p = truth["power_w"]
    lo = max(int(np.searchsorted(t, start)) - 1, 0)
    hi = min(int(np.searchsorted(t, end)) + 1, len(t))
    total = 0.0
    for a, b, pa, pb in zip(t[lo:hi - 1], t[lo + 1:hi], p[lo:hi - 1], p[lo + 1:hi]):
        for x, y in _subtract((max(a, start), min(b, end)), exclude):
            if y > x:
                px = pa + (pb - pa) * (x - a) / (b - a)
                py = pa + (pb - pa) * (y - a) / (b - a)
                total += (px + py) * 0.5 * (y - x)
    return total


def _subtract(span: tuple[float, float], holes: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    pieces = [span]
    for h0, h1 in holes:
        nxt = []
        for x, y in pieces:
            if h1 <= x or h0 >= y:
                nxt.append((x, y))
                continue
            if h0 > x:
                nxt.append((x, h0))
            if h1 < y:
                nxt.append((h1, y))
        pieces = nxt
    return pieces
