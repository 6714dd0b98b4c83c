"""Fault injection for the meter emulator: lost and corrupted lines, unplugging, overflow, clock drift.

    plan = FaultPlan(drop_rate=0.005, corrupt_rate=0.01, unplugs=(parse_window("3:2"),), drift_ppm=150)

Line faults touch sample lines only (``S,...``); identification and command
replies pass intact so a fault test exercises the data path, not the
handshake. A corrupted line has one bit of one byte before its newline
flipped (CRC-8 detects every single-bit error; a flip that makes a newline
splits the line, and both halves are then rejected as malformed).
Windows are ``AT:SECONDS`` in host seconds since the emulator started.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class FaultError(ValueError):
    """A fault option that cannot be carried out as written."""


@dataclass(frozen=True)
class Window:
    """A stretch of emulator time: from ``start`` seconds after start, for ``seconds``."""

    start: float
    seconds: float

    @property
    def end(self) -> float:
        return self.start + self.seconds

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


def parse_window(text: str) -> Window:
    """``"AT:SECONDS"`` -> Window, e.g. ``"3:2"`` = from 3 s after start, for 2 s."""
    at, sep, seconds = text.partition(":")
    try:
        window = Window(float(at), float(seconds))
    except ValueError:
        window = None
    if not sep or window is None or window.start < 0 or not window.seconds > 0:
        raise FaultError(f"expected AT:SECONDS with AT >= 0 and SECONDS > 0 (e.g. 3:2), got {text!r}")
    return window


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject; the default injects none."""

    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    unplugs: tuple[Window, ...] = ()
    overflow_bursts: tuple[Window, ...] = ()
    drift_ppm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop_rate", "corrupt_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise FaultError(f"{name} is a probability per line, 0 <= p < 1, got {value!r}")
        if self.drop_rate + self.corrupt_rate >= 1.0:
            raise FaultError("drop_rate + corrupt_rate must stay below 1: some lines have to get through")
        if not abs(self.drift_ppm) < 10000:
            raise FaultError(f"drift_ppm must be within +-10000 ppm, got {self.drift_ppm!r}")
        ordered = sorted(self.unplugs, key=lambda w: w.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise FaultError(f"unplug windows overlap: {a.start}:{a.seconds} and {b.start}:{b.seconds}")

    def unplugged_at(self, t: float) -> bool:
        return any(w.covers(t) for w in self.unplugs)

    def overflow_at(self, t: float) -> bool:
        return any(w.covers(t) for w in self.overflow_bursts)


class LineFaults:
    """Drops and corrupts sample lines with a seeded generator, and counts what it did."""

    def __init__(self, plan: FaultPlan, rng: np.random.Generator):
        self.plan = plan
        self.rng = rng
        self.dropped = 0
        self.corrupted = 0

    def apply(self, lines: list[str]) -> bytes:
        """Join framed lines into bytes, losing and damaging sample lines as planned."""
        data = "".join(lines).encode("ascii")
        drop, corrupt = self.plan.drop_rate, self.plan.corrupt_rate
        if not (drop or corrupt) or not lines:
            return data
        draws = self.rng.random(len(lines))
        out = []
        for line, draw in zip(lines, draws):
            raw = line.encode("ascii")
            if raw[:2] == b"S," and draw < drop + corrupt:
                if draw < drop:
                    self.dropped += 1
                    continue
                self.corrupted += 1
                damaged = bytearray(raw)
                pos = int(self.rng.integers(0, len(raw) - 1))
                damaged[pos] ^= 1 << int(self.rng.integers(0, 8))
                raw = bytes(damaged)
            out.append(raw)
        return b"".join(out)
