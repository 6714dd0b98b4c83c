"""Aggregation strategies: pure functions over named arrays, fed by the basestation loop.

A result is ``(values, weight)``: the named tensors one device sent (its
model difference, as ``{"0.weight": array, ...}``) and its weight (its sample
count). A strategy turns the results of a round into one set of tensors::

    strategy = get_strategy("fedavg")            # or "median", "trimmed_mean:0.1"
    delta = strategy.aggregate(3, [(update_a, 120), (update_b, 80)])

or, as the basestation does while updates arrive one by one::

    acc = strategy.accumulator()
    acc.add(update_a, 120); acc.add(update_b, 80)
    delta = acc.result()

- ``fedavg``: mean weighted by sample count (McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017).
  Its accumulator is a :class:`PartialSum` (sum of weighted values, sum of
  weights) and partial sums combine associatively, so ingest workers that
  each see part of the updates (MQTT 5 shared subscriptions, DESIGN.md
  "Scale") produce partials one coordinator adds up to the same result.
- ``median``: coordinate-wise median, unweighted (Yin, Chen, Ramchandran,
  Bartlett, "Byzantine-Robust Distributed Learning", ICML 2018).
- ``trimmed_mean:beta``: per coordinate, drop the ``floor(beta * N)`` largest
  and smallest values and average the rest, unweighted (same paper).

Nothing here touches the network or the store. Arithmetic is float64; results
are float32 like the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]
Result = tuple[Tensors, float]


class AggregationError(ValueError):
    """Results that cannot be aggregated: none, mismatched tensors, bad weights, non-finite values."""


def check_update(values: Tensors, reference: Tensors) -> None:
    """Raise AggregationError unless ``values`` has exactly the tensors of ``reference``, finite.

        >>> check_update({"w": np.zeros(2)}, {"w": np.ones(2)})
    """
    check_shapes(values, reference)
    for name, value in values.items():
        if not np.all(np.isfinite(value)):
            raise AggregationError(f"tensor {name!r} holds non-finite values")


def check_shapes(values: Tensors, reference: Tensors) -> None:
    """Raise AggregationError unless ``values`` has exactly the tensor names and shapes of ``reference``."""
    if list(values) != list(reference):
        missing = sorted(set(reference) - set(values))
        extra = sorted(set(values) - set(reference))
        raise AggregationError(f"tensor names differ from the model: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        got = np.shape(values[name])
        if got != np.shape(ref):
            raise AggregationError(f"tensor {name!r} has shape {got}; the model's is {np.shape(ref)}")


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise AggregationError(f"a result's weight (sample count) must be positive and finite, got {weight!r}")
    return w


@dataclass
class PartialSum:
    """FedAvg's sufficient statistics: sum of weight * values, sum of weights, count.

        >>> a = PartialSum(); a.add({"w": np.array([1.0])}, 1)
        >>> b = PartialSum(); b.add({"w": np.array([4.0])}, 2)
        >>> a.combine(b).result()["w"]
        array([3.], dtype=float32)
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    _scratch: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def add(self, values: Tensors, weight: float) -> None:
        """Accumulate one result (finiteness is checked once, on the sums, by :meth:`result`)."""
        w = _check_weight(weight)
        if self.count:
            check_shapes(values, self.sums)
            for name, value in values.items():
                scratch = self._scratch.get(name)
                if scratch is None:
                    scratch = self._scratch[name] = np.empty(np.shape(value), np.float64)
                np.multiply(value, w, out=scratch, dtype=np.float64)
                np.add(self.sums[name], scratch, out=self.sums[name])
        else:
            self.sums = {name: np.multiply(value, w, dtype=np.float64) for name, value in values.items()}
        self.weight += w
        self.count += 1

    def combine(self, other: "PartialSum") -> "PartialSum":
        """A new partial sum holding both (order does not matter)."""
        if not other.count:
            return PartialSum({k: v.copy() for k, v in self.sums.items()}, self.weight, self.count)
        if not self.count:
            return other.combine(self)
        check_update(other.sums, self.sums)
        sums = {name: self.sums[name] + other.sums[name] for name in self.sums}
        return PartialSum(sums, self.weight + other.weight, self.count + other.count)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean, float32."""
        if not self.count:
            raise AggregationError("no results to aggregate")
        out = {}
        for name, total in self.sums.items():
            if not np.all(np.isfinite(total)):
                raise AggregationError(f"tensor {name!r} holds non-finite values")
            out[name] = (total / self.weight).astype(np.float32)
        return out


@dataclass
class Collected:
    """Keeps every result (the robust statistics need all values of a coordinate)."""

    reduce: "Strategy"
    results: list[Result] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of results added."""
        return len(self.results)

    def add(self, values: Tensors, weight: float) -> None:
        """Keep one result (checked against the first)."""
        _check_weight(weight)
        check_update(values, self.results[0][0] if self.results else values)
        self.results.append(({k: np.asarray(v) for k, v in values.items()}, float(weight)))

    def result(self) -> dict[str, np.ndarray]:
        """The strategy applied to everything added."""
        return self.reduce.aggregate(0, self.results)


class Accumulator(Protocol):
    """What the basestation feeds update by update."""

    count: int

    def add(self, values: Tensors, weight: float) -> None: ...

    def result(self) -> dict[str, np.ndarray]: ...


class Strategy(Protocol):
    """One aggregation rule. ``failures`` (devices that did not answer) are passed openly."""

    name: str

    def aggregate(self, server_round: int, results: Sequence[Result],
                  failures: Sequence[str] = ()) -> dict[str, np.ndarray]: ...

    def accumulator(self) -> Accumulator: ...


def _stack(results: Sequence[Result]) -> dict[str, np.ndarray]:
    if not results:
        raise AggregationError("no results to aggregate")
    first = results[0][0]
    for values, weight in results:
        _check_weight(weight)
        check_update(values, first)
    return {name: np.stack([np.asarray(v[name], dtype=np.float64) for v, _ in results]) for name in first}


@dataclass(frozen=True)
class FedAvg:
    """Mean of the results weighted by sample count (the default)."""

    name: str = "fedavg"

    def aggregate(self, server_round: int, results: Sequence[Result],
                  failures: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Weighted mean of ``results``."""
        acc = self.accumulator()
        for values, weight in results:
            acc.add(values, weight)
        return acc.result()

    def accumulator(self) -> PartialSum:
        """A streaming :class:`PartialSum`."""
        return PartialSum()


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median of the results (weights ignored)."""

    name: str = "median"

    def aggregate(self, server_round: int, results: Sequence[Result],
                  failures: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Median of every coordinate over the results."""
        return {name: np.median(stack, axis=0).astype(np.float32) for name, stack in _stack(results).items()}

    def accumulator(self) -> Collected:
        """Collects results, reduces at the end."""
        return Collected(self)


@dataclass(frozen=True)
class TrimmedMean:
    """Per coordinate, the mean after dropping the ``floor(beta*N)`` largest and smallest values."""

    beta: float = 0.1
    name: str = "trimmed_mean"

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {self.beta!r}")

    def aggregate(self, server_round: int, results: Sequence[Result],
                  failures: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Trimmed mean of every coordinate over the results."""
        stacks = _stack(results)
        count = len(results)
        k = int(math.floor(self.beta * count))
        out = {}
        for name, stack in stacks.items():
            ordered = np.sort(stack, axis=0)
            out[name] = ordered[k:count - k].mean(axis=0).astype(np.float32)
        return out

    def accumulator(self) -> Collected:
        """Collects results, reduces at the end."""
        return Collected(self)


def get_strategy(spec: str) -> FedAvg | Median | TrimmedMean:
    """Strategy from its config name: ``fedavg``, ``median`` or ``trimmed_mean[:beta]``.

        >>> get_strategy("trimmed_mean:0.2")
        TrimmedMean(beta=0.2, name='trimmed_mean')
    """
    name, _, arg = str(spec).partition(":")
    if name == "fedavg" and not arg:
        return FedAvg()
    if name == "median" and not arg:
        return Median()
    if name == "trimmed_mean":
        try:
            return TrimmedMean(float(arg)) if arg else TrimmedMean()
        except ValueError as exc:
            raise ValueError(f"bad strategy {spec!r}: {exc}") from None
    raise ValueError(f"unknown strategy {spec!r}; choose 'fedavg', 'median' or 'trimmed_mean:BETA' (0 <= BETA < 0.5)")
