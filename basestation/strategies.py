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
            out[name] = (total / self._divisor()).astype(np.float32)
        return out

    def _divisor(self) -> float:
        return self.weight


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


# ---- client sampling (who trains in a round, and with which aggregation weight) ----

SAMPLINGS = ("uniform", "importance")


@dataclass(frozen=True)
class Selection:
    """The devices asked to train in one round and the weight each update gets.

    ``draws`` counts how often each device was drawn (importance sampling
    draws with replacement); ``probability`` is ``q_k``, the chance of one
    draw picking the device; ``shares`` is ``p_k = n_k / sum n`` over the
    population sampled from. With ``unbiased`` the aggregate is
    ``sum_k c_k delta_k`` with ``c_k = p_k draws_k / (K q_k)``, whose
    expectation over the draws is ``sum_k p_k delta_k`` (the full-participation
    FedAvg step); without it (everyone selected) it is plain FedAvg.
    """

    scheme: str
    k: int
    selected: tuple[str, ...]
    draws: dict[str, int]
    probability: dict[str, float]
    shares: dict[str, float]
    unbiased: bool

    def coefficient(self, device: str) -> float:
        """``c_k`` of ``device``: the factor its update is multiplied by in the aggregate."""
        if not self.unbiased:
            return self.shares[device]
        return self.shares[device] * self.draws[device] / (self.k * self.probability[device])

    def weight(self, device: str, samples: float) -> float:
        """The weight to feed the round's accumulator for an update of ``device`` with ``samples`` samples.

        Unbiased: ``c_k`` (the accumulator sums without dividing; ``p_k`` comes
        from the hello's sample count). Otherwise the sample count (FedAvg).
        """
        return self.coefficient(device) if self.unbiased else float(samples)

    def accumulator(self, strategy: "Strategy") -> Accumulator:
        """The accumulator of a round with this selection: fixed-denominator sums for unbiased FedAvg."""
        if self.unbiased and isinstance(strategy, FedAvg):
            return FixedSum()
        return strategy.accumulator()

    def to_json(self) -> dict[str, object]:
        """JSON-safe record of the selection (stored beside the round's plan)."""
        return {"scheme": self.scheme, "k": self.k, "selected": list(self.selected), "draws": dict(self.draws),
                "probability": dict(self.probability), "shares": dict(self.shares), "unbiased": self.unbiased}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> "Selection":
        """Inverse of :meth:`to_json`."""
        return cls(scheme=str(doc["scheme"]), k=int(doc["k"]), selected=tuple(doc["selected"]),  # type: ignore
                   draws={str(k): int(v) for k, v in dict(doc["draws"]).items()},  # type: ignore[arg-type]
                   probability={str(k): float(v) for k, v in dict(doc["probability"]).items()},  # type: ignore
                   shares={str(k): float(v) for k, v in dict(doc["shares"]).items()},  # type: ignore
                   unbiased=bool(doc["unbiased"]))


@dataclass
class FixedSum(PartialSum):
    """``sum_k w_k values_k`` (weights already hold ``c_k``), not divided by the sum of weights."""

    def _divisor(self) -> float:
        return 1.0


def check_sampling(scheme: str) -> str:
    """``scheme`` if it is a known sampling scheme, else ValueError naming the choices."""
    if scheme not in SAMPLINGS:
        raise ValueError(f"unknown sampling scheme {scheme!r}; choose 'uniform' or 'importance'")
    return scheme


def importance_probabilities(devices: Sequence[str], variances: Mapping[str, float]) -> dict[str, float]:
    """``q_k`` proportional to ``1 / sigma_k^2`` (Kim et al. 2022, reference/kim2022-model.md).

    A device without a usable report yet (none, zero, non-finite) gets the
    median of the known variances, so it is neither starved nor favoured;
    with no report at all the probabilities are uniform.

        >>> importance_probabilities(["a", "b"], {"a": 1.0, "b": 3.0})
        {'a': 0.75, 'b': 0.25}
    """
    known = {d: float(v) for d, v in variances.items()
             if d in set(devices) and v is not None and math.isfinite(float(v)) and float(v) > 0}
    if not known:
        return {d: 1.0 / len(devices) for d in devices}
    fill = float(np.median(list(known.values())))
    inverse = {d: 1.0 / known.get(d, fill) for d in devices}
    total = math.fsum(inverse.values())
    return {d: inverse[d] / total for d in devices}


def sample_devices(scheme: str, population: Sequence[str], k: int, *, seed: int, round_: int,
                   samples: Mapping[str, int] | None = None,
                   variances: Mapping[str, float] | None = None) -> Selection:
    """Draw the devices of one round; pure and seeded by (seed, round).

    ``uniform``: ``k`` distinct devices, every subset equally likely
    (inclusion probability ``k/N``; the weights use ``q_k = 1/N`` per draw).
    ``importance``: ``k`` draws with replacement from ``q_k ∝ 1/sigma_k^2``;
    a device drawn twice trains once and counts twice. ``k <= 0`` or
    ``k >= N`` (uniform) selects everyone and aggregates with plain FedAvg.
    ``samples`` (device -> sample count, from the hellos) gives ``p_k``; a
    device missing from it counts as the mean.

        >>> s = sample_devices("uniform", ["a", "b", "c", "d"], 2, seed=0, round_=1, samples={"a": 10, "b": 10,
        ...                    "c": 10, "d": 10})
        >>> len(s.selected), round(sum(s.coefficient(d) for d in s.selected), 6)
        (2, 1.0)
    """
    check_sampling(scheme)
    pool = sorted(set(population))
    if not pool:
        return Selection(scheme, 0, (), {}, {}, {}, False)
    shares = _shares(pool, samples or {})
    if k <= 0 or (k >= len(pool) and scheme == "uniform"):
        return Selection(scheme, len(pool), tuple(pool), {d: 1 for d in pool}, {d: 1.0 for d in pool}, shares,
                         False)
    rng = np.random.default_rng([seed, round_, SAMPLINGS.index(scheme)])
    if scheme == "uniform":
        chosen = rng.choice(len(pool), size=k, replace=False)
        draws = {pool[i]: 1 for i in chosen}
        probability = {d: 1.0 / len(pool) for d in pool}
    else:
        probability = importance_probabilities(pool, variances or {})
        picks = rng.choice(len(pool), size=k, replace=True, p=[probability[d] for d in pool])
        draws = {}
        for i in picks:
            draws[pool[i]] = draws.get(pool[i], 0) + 1
    selected = tuple(sorted(draws))
    return Selection(scheme, k, selected, draws, {d: probability[d] for d in selected},
                     {d: shares[d] for d in selected}, True)


def _shares(pool: Sequence[str], samples: Mapping[str, int]) -> dict[str, float]:
    known = [float(samples[d]) for d in pool if samples.get(d)]
    fill = math.fsum(known) / len(known) if known else 1.0
    counts = {d: float(samples.get(d) or fill) for d in pool}
    total = math.fsum(counts.values())
    return {d: counts[d] / total for d in pool}
