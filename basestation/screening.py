"""Aggregate a round so that the result can always be committed: drop the updates that would poison it.

    entries = [Entry(nonce, device, delta, samples), ...]
    outcome = aggregate_screened(strategy.accumulator, entries, evaluate, bounds)
    outcome.delta, outcome.weights, outcome.loss   # None when no subset was acceptable
    outcome.dropped                               # [(entry, reason), ...]

Each update passed its own bounds at ingest, so for the mean, median and
trimmed mean the aggregate is within the same bound; this is the last line
before the store: it also catches a non-finite model or evaluation (a
strategy bug, an update stored by an older basestation). Until the result is
acceptable, the update that pulls hardest (its weight x largest |value|) is
dropped, with the problem it caused as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from basestation.bounds import UpdateBounds, check_result
from basestation.strategies import Accumulator, AggregationError

Evaluate = Callable[[Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], float, float]]


@dataclass(frozen=True)
class Entry:
    """One accepted update of the round."""

    nonce: str
    device: str
    delta: Mapping[str, np.ndarray]
    samples: int
    weight: float | None = None  # the accumulator weight when it is not the sample count (importance sampling)

    @property
    def accumulator_weight(self) -> float:
        """What this update is weighted by in the running aggregate."""
        return float(self.samples) if self.weight is None else self.weight

    def pull(self) -> float:
        """How hard it moves a weighted mean: its weight times its largest magnitude (inf if non-finite)."""
        top = max((float(np.max(np.abs(v))) for v in self.delta.values() if np.size(v)), default=0.0)
        return self.accumulator_weight * (top if np.isfinite(top) else float("inf"))


@dataclass
class Screened:
    """The committed-safe result, or none, and what was dropped on the way."""

    delta: dict[str, np.ndarray] | None = None
    weights: dict[str, np.ndarray] | None = None
    loss: float = float("nan")
    accuracy: float = float("nan")
    kept: list[Entry] = field(default_factory=list)
    dropped: list[tuple[Entry, str]] = field(default_factory=list)


def try_result(delta_of: Callable[[], dict[str, np.ndarray]], evaluate: Evaluate,
               bounds: UpdateBounds) -> tuple[Any, str | None]:
    """(delta, weights, loss, accuracy) and None, or None and the problem."""
    try:
        delta = delta_of()
    except (AggregationError, FloatingPointError, OverflowError) as exc:
        return None, f"aggregate: {exc}"
    with np.errstate(all="ignore"):  # a non-finite model is reported by check_result, not by warnings
        weights, loss, accuracy = evaluate(delta)
    problem = check_result(delta, weights, loss, accuracy, bounds)
    return (None, problem) if problem else ((delta, weights, loss, accuracy), None)


def aggregate_screened(new_accumulator: Callable[[], Accumulator], entries: Sequence[Entry], evaluate: Evaluate, bounds: UpdateBounds,
                       first_problem: str | None = None) -> Screened:
    """Drop the hardest-pulling update until the aggregate passes (see the module docstring)."""
    kept = list(entries)
    out = Screened()
    problem = first_problem
    while kept:
        if problem is None:
            acc = new_accumulator()
            for e in kept:
                acc.add(e.delta, e.accumulator_weight)
            result, problem = try_result(acc.result, evaluate, bounds)
            if result is not None:
                out.delta, out.weights, out.loss, out.accuracy = result
                out.kept = kept
                return out
        worst = max(kept, key=Entry.pull)
        kept.remove(worst)
        out.dropped.append((worst, f"dropped from the aggregate: {problem}"))
        problem = None
    return out
