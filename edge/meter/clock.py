"""Meter-to-host clock alignment: offset and drift from arrival times, robust to USB latency.

Each sample carries the meter's clock ``t`` (seconds since the meter booted);
the host notes when the line arrived, ``h`` (``time.monotonic()``). Then
``h = t + offset + skew * (t - ref) + delay`` with ``delay >= 0``: the serial
link can only make a line late, never early. So the line that fits the data
is the *lower envelope* of the points ``(t, h - t)``, not a least-squares
line through them (which would be biased by the mean latency and pulled
around by its jitter).

The fit keeps the minimum-delay point of each short bucket (0.25 s) over a
sliding window (30 s), takes the lower convex hull of those minima, and
chooses the hull edge that minimises the total distance to all of them (the
linear program ``min sum(y_i - a - b x_i)`` subject to ``y_i >= a + b x_i``,
whose optimum is the hull edge above the mean ``x``). Between refits a point
below the line lowers the offset at once, so the line never lies above the
data. Usage::

    clock = ClockAligner()
    clock.observe(meter_seconds, time.monotonic())    # for every sample
    host_time = clock.to_host(meter_seconds)
"""

from __future__ import annotations

from collections import deque

# Floor of the minima's spread in both uncertainties: minima that line up exactly still carry timing error.
MIN_DELAY_SPREAD_S = 20e-6


class ClockAligner:
    """Lower-envelope fit of host time against meter time (see the module docstring)."""

    def __init__(self, *, bucket_seconds: float = 0.25, window_seconds: float = 30.0, max_skew_ppm: float = 1000.0):
        if not 0 < bucket_seconds < window_seconds:
            raise ValueError(f"need 0 < bucket_seconds < window_seconds, got {bucket_seconds} and {window_seconds}")
        if not max_skew_ppm > 0:
            raise ValueError(f"max_skew_ppm must be positive, got {max_skew_ppm}")
        self.bucket_seconds = bucket_seconds
        self.window_seconds = window_seconds
        self.max_skew = max_skew_ppm * 1e-6
        self.reset()

    def reset(self) -> None:
        """Forget everything (the meter rebooted or was replaced)."""
        self._buckets: deque[tuple[float, float]] = deque(maxlen=max(2, round(self.window_seconds / self.bucket_seconds)))
        self._ref = 0.0
        self._offset = 0.0
        self._skew = 0.0
        self._bucket_end: float | None = None
        self._best_x = 0.0
        self._best_y = 0.0
        self._spread = 0.0
        self._edge_s = 0.0
        self._edge_spread: float | None = None
        self.observations = 0

    @property
    def ready(self) -> bool:
        """True once there is at least one observation to map with."""
        return self._bucket_end is not None

    @property
    def rate(self) -> float:
        """Host seconds per meter second (1 - drift)."""
        return 1.0 + self._skew

    @property
    def drift_ppm(self) -> float:
        """How fast the meter clock runs against the host's, in parts per million (positive: meter fast)."""
        return (1.0 / (1.0 + self._skew) - 1.0) * 1e6

    @property
    def drift_uncertainty_ppm(self) -> float | None:
        """How far off :attr:`drift_ppm` may be, in ppm; None before there is a slope to judge.

        The slope comes from the two bucket minima that end the chosen hull
        edge. Each may sit above the true line by as much as the other minima
        sit above the fitted one (their mean height, the edge's own two left
        out, since they lie on it by construction), so the slope is good to
        about twice that over the edge's length. A read of a second or two
        spans little, and its drift means little: the uncertainty says so.
        None also while only the edge's two minima exist.
        """
        if self._edge_s <= 0 or self._edge_spread is None:
            return None
        return 2.0 * max(self._edge_spread, MIN_DELAY_SPREAD_S) / self._edge_s * 1e6

    @property
    def uncertainty_s(self) -> float:
        """Typical distance of the bucket minima above the fitted line: the scale of the offset error."""
        return max(self._spread, MIN_DELAY_SPREAD_S)

    def observe(self, meter_s: float, host_s: float) -> None:
        """Add one (meter time, host arrival time) pair; meter times must not decrease."""
        y = host_s - meter_s
        self.observations += 1
        if self._bucket_end is None:
            self._ref, self._offset = meter_s, y
            self._bucket_end = meter_s + self.bucket_seconds
            self._best_x, self._best_y = meter_s, y
            return
        if meter_s >= self._bucket_end:
            self._buckets.append((self._best_x, self._best_y))
            self._best_x, self._best_y = meter_s, y
            self._bucket_end = meter_s + self.bucket_seconds
            if len(self._buckets) >= 2:
                self._refit()
        elif y < self._best_y:
            self._best_x, self._best_y = meter_s, y
        below = self._offset + self._skew * (meter_s - self._ref) - y
        if below > 0:
            self._offset -= below

    def to_host(self, meter_s: float) -> float:
        """Host monotonic time at which the meter's clock read ``meter_s``."""
        return meter_s + self._offset + self._skew * (meter_s - self._ref)

    def to_meter(self, host_s: float) -> float:
        """Meter time at host monotonic time ``host_s`` (inverse of ``to_host``)."""
        return (host_s - self._offset + self._skew * self._ref) / (1.0 + self._skew)

    def _refit(self) -> None:
        points = list(self._buckets)
        hull: list[tuple[float, float]] = []
        for p in points:  # lower convex hull, monotone chain (points are sorted by x)
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        mean_x = sum(x for x, _ in points) / len(points)
        (x0, y0), (x1, y1) = hull[0], hull[1]
        for a, b in zip(hull, hull[1:]):
            (x0, y0), (x1, y1) = a, b
            if b[0] >= mean_x:
                break
        skew = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        self._edge_s = x1 - x0
        ref, offset = x0, y0
        if abs(skew) > self.max_skew:  # implausible: keep a bounded slope, lowest line under all points
            skew = max(-self.max_skew, min(self.max_skew, skew))
            ref = points[-1][0]
            offset = min(y - skew * (x - ref) for x, y in points)
        self._ref, self._offset, self._skew = ref, offset, skew
        below = offset + skew * (self._best_x - ref) - self._best_y
        if below > 0:
            self._offset -= below
        heights = [y - self.to_host(x) + x for x, y in points]
        self._spread = sum(heights) / len(points)
        others = [h for (x, _), h in zip(points, heights) if x not in (x0, x1)]
        self._edge_spread = sum(others) / len(others) if others else None


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
