"""Energy over named phases, from power samples placed on the host's clock. Pure math, no I/O.

The stream of samples arrives as two kinds of events:

- ``interval(a, b, pa, pb, duration, lost)``: two consecutive good samples at
  host times ``a`` and ``b`` with powers ``pa`` and ``pb``; the trapezoid
  between them is integrated. ``duration`` is the meter's own interval
  converted to host seconds (rate-corrected), so a small step in the clock
  fit between two samples does not change the energy; ``lost`` counts lines
  known to be missing inside the interval (bridged by the trapezoid);
- ``point(h, valid)``: a sample that starts a new run (the first one, the one
  after a gap or a reconnection) or an overflow sample, integrated with nothing.

A phase ``[start, end)`` collects the part of every interval that overlaps it
(splitting the trapezoid at its boundaries, by linear interpolation). Any
stretch of the phase that no interval covers is a gap: it is listed, its
length is ``gap_seconds`` and the phase is ``partial``; its energy is not
guessed. A phase is final once a sample at or after its end has arrived (or
when the caller gives up waiting, and then the uncovered tail is a gap).
Recent events are kept for ``history_seconds`` so a phase may start a little
in the past (e.g. at a time stamp taken before the call that opens it).

Uncertainty (one standard uncertainty, in joules): sample noise estimated
from successive differences and propagated through the trapezoids; bridged
intervals (noise plus half the step across them); the clock's offset
uncertainty at both boundaries; plus ``gain_tolerance * |joules|`` added
linearly for the current sensor's gain error (INA219B: 0.5 % max over
temperature, datasheet 7.5).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping

_EPS = 1e-6  # seconds; holes shorter than this are floating-point noise, not gaps


@dataclass(frozen=True)
class PhaseEnergy:
    """Energy of one completed phase. Times are host ``time.monotonic()`` seconds.

    ``joules`` integrates only the covered part; ``joules_above_idle`` subtracts
    ``idle_watts`` over that same covered time. ``partial`` is True when any
    part of the phase had no data (``gaps`` lists those stretches).
    """

    name: str
    start: float
    end: float
    joules: float
    joules_above_idle: float
    idle_watts: float
    covered_seconds: float
    gap_seconds: float
    gaps: tuple[tuple[float, float], ...]
    samples: int
    lost_samples: int
    overflow_samples: int
    uncertainty_j: float
    crc_errors: int = 0
    malformed_lines: int = 0
    meter_errors: int = 0
    reconnects: int = 0

    @property
    def seconds(self) -> float:
        """Length of the phase (end - start), covered or not."""
        return self.end - self.start

    @property
    def partial(self) -> bool:
        """True when part of the phase has no data: its energy covers only ``covered_seconds``."""
        return bool(self.gaps)

    @property
    def mean_watts(self) -> float:
        """Mean power over the covered time (0 when nothing was covered)."""
        return self.joules / self.covered_seconds if self.covered_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for a log."""
        text = (f"{self.name}: {self.joules:.4f} J ({self.joules_above_idle:+.4f} J above idle) "
                f"+- {self.uncertainty_j:.4f} J over {self.seconds:.3f} s, {self.samples} samples")
        if self.partial:
            text += f", PARTIAL: {self.gap_seconds:.3f} s without data in {len(self.gaps)} gap(s)"
        if self.lost_samples or self.overflow_samples:
            text += f", {self.lost_samples} lost and {self.overflow_samples} overflow samples"
        return text


class PhaseToken:
    """The running sums of one phase, while it is open or waiting for its last samples."""

    __slots__ = ("name", "start", "end", "cursor", "joules", "covered", "gaps", "samples", "lost", "overflow",
                 "sum_dp2", "n_dp", "sum_dt2", "bridge_dt2", "bridge_step2", "p_first", "p_last",
                 "counters_start", "result")

    def __init__(self, name: str, start: float, counters_start: Mapping[str, int]):
        self.name = name
        self.start = start
        self.end = math.inf
        self.cursor = start
        self.joules = 0.0
        self.covered = 0.0
        self.gaps: list[list[float]] = []
        self.samples = self.lost = self.overflow = self.n_dp = 0
        self.sum_dp2 = self.sum_dt2 = self.bridge_dt2 = self.bridge_step2 = 0.0
        self.p_first: float | None = None
        self.p_last: float | None = None
        self.counters_start = dict(counters_start)
        self.result: PhaseEnergy | None = None

    def __repr__(self) -> str:
        state = "done" if self.result else ("open" if self.end == math.inf else "settling")
        return f"<PhaseToken {self.name!r} {state} start={self.start:.3f}>"


class EnergyIntegrator:
    """Integrates power over phases; see the module docstring. Not thread-safe: callers lock."""

    def __init__(self, *, history_seconds: float = 2.0, gain_tolerance: float = 0.0,
                 counters: Callable[[], Mapping[str, int]] | None = None):
        if history_seconds < 0 or gain_tolerance < 0:
            raise ValueError(f"history_seconds and gain_tolerance must be >= 0, got {history_seconds}, {gain_tolerance}")
        self.history_seconds = history_seconds
        self.gain_tolerance = gain_tolerance
        self.idle_watts = 0.0
        self.clock_uncertainty_s = 0.0
        self.latest: float | None = None
        self._counters = counters or (lambda: {})
        self._history: deque[tuple] = deque()
        self._active: list[PhaseToken] = []

    # --- events -------------------------------------------------------------------------------
    def interval(self, a: float, b: float, pa: float, pb: float, duration: float, lost: int = 0) -> None:
        """Two consecutive good samples: integrate the trapezoid between host times ``a`` and ``b``."""
        event = (a, b, pa, pb, duration, lost)
        self._history.append(event)
        for token in self._active:
            self._apply_interval(token, *event)
        self._advance(b)

    def point(self, h: float, valid: bool = True) -> None:
        """A sample with no good predecessor (start of a run), or an overflow sample (``valid=False``)."""
        event = (h, valid)
        self._history.append(event)
        for token in self._active:
            self._apply_point(token, h, valid)
        self._advance(h)

    # --- phases -------------------------------------------------------------------------------
    def open(self, name: str, start: float) -> PhaseToken:
        """Start a phase at host time ``start`` (may be up to ``history_seconds`` in the past)."""
        token = PhaseToken(name, start, self._counters())
        for event in self._history:
            if len(event) == 2:
                self._apply_point(token, *event)
            else:
                self._apply_interval(token, *event)
        self._active.append(token)
        return token

    def close(self, token: PhaseToken, end: float) -> None:
        """End a phase at host time ``end``; it becomes final once a sample at or after ``end`` arrives."""
        if token.result is not None or token.end != math.inf:
            raise ValueError(f"phase {token.name!r} was already ended")
        if end < token.start:
            raise ValueError(f"phase {token.name!r} cannot end ({end}) before it starts ({token.start})")
        token.end = end
        if self.latest is not None and self.latest >= end:
            self._finalize(token)

    def settle(self, token: PhaseToken) -> PhaseEnergy:
        """Final result now: if samples past the end never came, the uncovered tail counts as a gap."""
        if token.result is not None:
            return token.result
        if token.end == math.inf:
            raise ValueError(f"phase {token.name!r} is still open; close it first")
        return self._finalize(token)

    # --- internals ----------------------------------------------------------------------------
    def _advance(self, h: float) -> None:
        if self.latest is None or h > self.latest:
            self.latest = h
        horizon = self.latest - self.history_seconds
        history = self._history
        while history and history[0][1 if len(history[0]) > 2 else 0] < horizon:
            history.popleft()
        done = [t for t in self._active if t.end <= self.latest]
        for token in done:
            self._finalize(token)

    def _apply_point(self, t: PhaseToken, h: float, valid: bool) -> None:
        if t.start <= h < t.end:
            if valid:
                t.samples += 1
            else:
                t.overflow += 1

    def _apply_interval(self, t: PhaseToken, a: float, b: float, pa: float, pb: float, dur: float, lost: int) -> None:
        s, e = t.start, t.end
        if b < s or a >= e:
            return
        lo = a if a > s else s
        if lo > t.cursor + _EPS:
            _add_gap(t.gaps, t.cursor, lo)
        if b <= a:  # the clock fit stepped back: no span to split, the whole interval sits at a
            frac, pl, ph = 1.0, pa, pb
            hi = lo
        else:
            hi = b if b < e else e
            if hi <= lo:
                frac = 0.0
                pl = ph = pa
            elif lo == a and hi == b:
                frac, pl, ph = 1.0, pa, pb
            else:
                span = b - a
                pl = pa + (pb - pa) * (lo - a) / span
                ph = pa + (pb - pa) * (hi - a) / span
                frac = (hi - lo) / span
        if frac > 0.0:
            part = dur * frac
            t.joules += (pl + ph) * 0.5 * part
            t.covered += part
            step = pb - pa
            t.sum_dp2 += step * step
            t.n_dp += 1
            t.sum_dt2 += part * part
            if lost:
                t.bridge_dt2 += part * part
                t.bridge_step2 += (step * part * 0.5) ** 2
            if t.p_first is None:
                t.p_first = pl
            t.p_last = ph
            if hi > t.cursor:
                t.cursor = hi
        if s <= b < e:
            t.samples += 1
            t.lost += lost

    def _finalize(self, t: PhaseToken) -> PhaseEnergy:
        if t.result is not None:
            return t.result
        if t.end - t.cursor > _EPS:
            _add_gap(t.gaps, t.cursor, t.end)
        noise_var = t.sum_dp2 / (2 * t.n_dp) if t.n_dp else 0.0
        u_clock = self.clock_uncertainty_s
        boundary = ((t.p_first or 0.0) ** 2 + (t.p_last or 0.0) ** 2) * u_clock * u_clock
        variance = noise_var * (t.sum_dt2 + t.bridge_dt2) + t.bridge_step2 + boundary
        uncertainty = math.sqrt(variance) + self.gain_tolerance * abs(t.joules)
        now = self._counters()
        delta = {k: now.get(k, 0) - t.counters_start.get(k, 0) for k in now}
        gaps = tuple((lo, hi) for lo, hi in t.gaps)
        t.result = PhaseEnergy(
            name=t.name, start=t.start, end=t.end, joules=t.joules,
            joules_above_idle=t.joules - self.idle_watts * t.covered, idle_watts=self.idle_watts,
            covered_seconds=t.covered, gap_seconds=sum(hi - lo for lo, hi in gaps), gaps=gaps,
            samples=t.samples, lost_samples=t.lost, overflow_samples=t.overflow, uncertainty_j=uncertainty,
            crc_errors=delta.get("crc_errors", 0), malformed_lines=delta.get("malformed_lines", 0),
            meter_errors=delta.get("meter_errors", 0), reconnects=delta.get("reconnects", 0),
        )
        if t in self._active:
            self._active.remove(t)
        return t.result


def _add_gap(gaps: list[list[float]], lo: float, hi: float) -> None:
    if gaps and lo <= gaps[-1][1] + _EPS:
        gaps[-1][1] = max(gaps[-1][1], hi)
    else:
        gaps.append([lo, hi])
