"""What a device may claim: bounds on an update's values and sample count, and on the aggregate.

Every check returns None when the claim is possible, else a sentence saying
why not; the caller records it with reason ``out_of_bounds`` (ingest) or
drops the update from the round (aggregation)::

    bounds = UpdateBounds.for_round(n=8, settings=BoundSettings())
    problem = bounds.check(delta, samples=50, shard_size=120)   # None, or "samples 4294967295 > ..."

Where the defaults come from (docs/security.md, "Bounds"):

- At n < 32 bits every weight lives on the grid [-1, 1] (edge.fixedpoint), so
  a model difference has |value| <= 2; the m-bit uplink quantizer picks a
  power-of-two scale, which can round a magnitude up by less than a factor
  2. Hence ``|value| <= 4`` per tensor entry.
- At n = 32 (float training) weights have no grid. ``float_update_abs``
  (default 16) is a configured sanity limit, far above what SGD moves a
  weight in one round at the learning rates the testbed uses (lr <= 1,
  gradients of a softmax MLP on [0, 1] inputs are O(1) per step).
- ``samples`` at most the shard size the device declared in its first hello
  (fixed from then on: a later hello cannot raise it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

GRID_DIFFERENCE = 2.0  # weights on the [-1, 1] grid differ by at most 2
SCALE_SLACK = 2.0  # a power-of-two uplink scale rounds a magnitude up by less than 2x


@dataclass(frozen=True)
class BoundSettings:
    """The ``[bounds]`` table of basestation.toml (0 means: derive from the architecture and the round's n)."""

    max_update_abs: float = 0.0
    float_update_abs: float = 16.0
    clock_skew_seconds: float = 30.0


@dataclass(frozen=True)
class UpdateBounds:
    """The limits one round's updates are held to."""

    max_abs: float

    @classmethod
    def for_round(cls, n: int, settings: BoundSettings | None = None) -> "UpdateBounds":
        """The bound for a round training at ``n`` bits.

            >>> UpdateBounds.for_round(8).max_abs
            4.0
        """
        settings = settings or BoundSettings()
        if settings.max_update_abs > 0:
            return cls(float(settings.max_update_abs))
        if n >= 32:
            return cls(float(settings.float_update_abs))
        return cls(GRID_DIFFERENCE * SCALE_SLACK)

    def check_values(self, values: Mapping[str, np.ndarray]) -> str | None:
        """None if every entry is finite and within ``max_abs``, else which tensor is not."""
        for name, value in values.items():
            arr = np.asarray(value)
            if arr.size == 0:
                continue
            if not np.all(np.isfinite(arr)):
                return f"tensor {name!r} holds non-finite values"
            top = float(np.max(np.abs(arr)))
            if top > self.max_abs:
                return f"tensor {name!r} reaches |value| {top:.6g}, the bound is {self.max_abs:g}"
        return None

    def check(self, values: Mapping[str, np.ndarray], samples: int, shard_size: int | None) -> str | None:
        """Samples first (cheap), then the values."""
        problem = check_samples(samples, shard_size)
        return problem if problem is not None else self.check_values(values)


def check_samples(samples: int, shard_size: int | None) -> str | None:
    """None if ``1 <= samples <= shard_size`` (any positive count when the size is unknown)."""
    if samples < 1:
        return f"samples {samples} < 1"
    if shard_size is not None and samples > shard_size:
        return f"samples {samples} > the shard size {shard_size} the device declared"
    return None


def check_result(delta: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], loss: float,
                 accuracy: float, bounds: UpdateBounds) -> str | None:
    """None if an aggregate can be committed: finite, within the bound, and a finite evaluation."""
    problem = bounds.check_values(delta)
    if problem is not None:
        return f"aggregate: {problem}"
    for name, value in weights.items():
        if not np.all(np.isfinite(value)):
            return f"new model: tensor {name!r} holds non-finite values"
    if not (math.isfinite(loss) and math.isfinite(accuracy)):
        return f"evaluation of the new model is not finite (loss {loss!r}, accuracy {accuracy!r})"
    return None


# Rated current of each board's recommended supply (A): Raspberry Pi documentation, "Power supply"
# (Zero 2 W 2.5 A, Pi 4 3.0 A, Pi 5 5.0 A; docs/boards.md). A board cannot draw more than its supply
# delivers for longer than a transient, so supply_v x this is the most a phase can average.
SUPPLY_AMPS = {"pi-zero-2w": 2.5, "pi4": 3.0, "pi5": 5.0}
PHASE_SLACK_S = 1.0  # a phase's window is sampled at the meter's rate: allow one second of edges


@dataclass(frozen=True)
class EnergyLimits:
    """The most power a board can draw, and how far its clock may be off the basestation's."""

    board: str
    max_watts: float
    clock_skew_s: float = 30.0

    @classmethod
    def for_board(cls, board: str | None, clock_skew_s: float = 30.0) -> "EnergyLimits":
        """Limits of a board profile by name; an unknown board gets the largest of the known ones."""
        watts = board_watts()
        if board in watts:
            return cls(str(board), watts[board], clock_skew_s)  # type: ignore[index]
        return cls(str(board), max(watts.values(), default=5.1 * max(SUPPLY_AMPS.values())), clock_skew_s)


@functools.lru_cache(maxsize=1)
def board_watts() -> dict[str, float]:
    """Most watts each shipped board profile can draw: its supply's rating, else twice its full load."""
    from firmware_tools.emulator.boards import BoardError, load_boards

    try:
        profiles = load_boards()
    except BoardError:
        return {}
    return {name: p.supply_v * SUPPLY_AMPS[name] if name in SUPPLY_AMPS else 2.0 * (p.idle_w + p.core_w * p.cores)
            for name, p in profiles.items()}


def check_energy_report(body: Mapping[str, object], limits: EnergyLimits, opened_at: float,
                        now: float) -> str | None:
    """None if an energy report's timestamps lie inside its round and every phase's energy is possible."""
    skew = limits.clock_skew_s
    started, sent = body.get("started_at"), body.get("sent_at")
    for name, value in (("started_at", started), ("sent_at", sent)):
        if value is None:
            continue
        if not _number(value):
            return f"{name} must be a number, got {value!r}"
        if not opened_at - skew <= float(value) <= now + skew:  # type: ignore[arg-type]
            return (f"{name} {float(value):.3f} lies outside the round ({opened_at:.3f} .. {now:.3f}, "  # type: ignore[arg-type]
                    f"+-{skew:g} s of clock skew)")
    if _number(started) and _number(sent) and float(sent) < float(started):  # type: ignore[arg-type]
        return f"sent_at {sent} is before started_at {started}"
    span = now - opened_at + skew
    meter = body.get("meter")
    phases = meter.get("phases") if isinstance(meter, Mapping) else None
    if not isinstance(phases, Mapping):
        return None
    for phase, figures in phases.items():
        if not isinstance(figures, Mapping):
            return f"phase {phase!r} is not a table of figures"
        seconds = figures.get("seconds")
        if seconds is not None and (not _number(seconds) or not 0 <= float(seconds) <= span):  # type: ignore[arg-type]
            return f"phase {phase!r} lasts {seconds!r} s, the round has lasted {span:.1f} s"
        window = (float(seconds) if _number(seconds) else span) + PHASE_SLACK_S  # type: ignore[arg-type]
        most = limits.max_watts * window
        for field_name in ("joules", "joules_above_idle", "uncertainty_j"):
            value = figures.get(field_name)
            if value is None:
                continue
            if not _number(value):
                return f"phase {phase!r} {field_name} must be a number, got {value!r}"
            low = -most if field_name == "joules_above_idle" else 0.0
            if not low <= float(value) <= most:  # type: ignore[arg-type]
                return (f"phase {phase!r} {field_name} {float(value):.6g} J is impossible for board "  # type: ignore[arg-type]
                        f"{limits.board!r} ({limits.max_watts:g} W at most over {window:.1f} s: "
                        f"{low:.6g} .. {most:.6g} J)")
    return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
