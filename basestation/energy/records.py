"""What the basestation hands the energy model each round: energy records and training statistics.

Plain dataclasses, one per device per round, checked on construction so a bad
report fails where it enters rather than inside a fit:

    >>> from basestation.energy.records import EnergyRecord
    >>> EnergyRecord(device="pi-1", round=3, n=16, m=8, local_iters=5, batch_size=32,
    ...              train_j=1.9, uplink_j=0.02, uplink_bits=19_280).train_j_per_iter
    0.38
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class EnergyRecord:
    """Measured energy of one device in one round.

    ``train_j`` and ``uplink_j`` are joules above the idle baseline for the
    ``train`` and ``uplink`` meter phases (they may be slightly negative for a
    short phase on a noisy meter); ``uplink_bits`` is what was sent (payload and
    headers) in ``messages`` messages.
    """

    device: str
    round: int
    n: int
    m: int
    local_iters: int
    batch_size: int
    train_j: float
    uplink_j: float
    uplink_bits: int
    messages: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")
        _int_at_least("round", self.round, 0)
        _int_in("n", self.n, 1, 32)
        _int_in("m", self.m, 1, 32)
        _int_at_least("local_iters", self.local_iters, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("uplink_bits", self.uplink_bits, 0)
        _int_at_least("messages", self.messages, 0)
        for name in ("train_j", "uplink_j"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a finite number of joules, got {value!r}")
        _normalise(self, ("round", "n", "m", "local_iters", "batch_size", "uplink_bits", "messages"),
                   ("train_j", "uplink_j"))

    @property
    def train_j_per_iter(self) -> float:
        """Joules above idle per local iteration."""
        return self.train_j / self.local_iters

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EnergyRecord":
        """Inverse of ``to_dict``; unknown keys are an error."""
        return cls(**dict(data))


@dataclass(frozen=True)
class RoundStats:
    """Training statistics one device reports for one round (from ``edge.trainer.TrainResult``).

    ``loss`` is the mean minibatch loss over the local iterations,
    ``grad_sq_norm`` the mean squared norm of the minibatch gradients,
    ``grad_variance`` the mean of E||g - mean g||^2 over the minibatch (summed
    over coordinates, so in the same units as ``grad_sq_norm``), ``lr`` the
    learning rate used (needed only for the curvature estimate of L).
    """

    device: str
    round: int
    loss: float
    grad_sq_norm: float
    grad_variance: float
    samples: int
    local_iters: int
    n: int = 32
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")
        _int_at_least("round", self.round, 0)
        _int_at_least("samples", self.samples, 1)
        _int_at_least("local_iters", self.local_iters, 1)
        _int_in("n", self.n, 1, 32)
        for name in ("loss", "grad_sq_norm", "grad_variance"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.lr is not None and not (_is_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number or None, got {self.lr!r}")
        _normalise(self, ("round", "samples", "local_iters", "n"), ("loss", "grad_sq_norm", "grad_variance", "lr"))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RoundStats":
        """Inverse of ``to_dict``; unknown keys are an error."""
        return cls(**dict(data))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _normalise(obj: Any, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """Store numpy scalars as plain Python numbers so records serialise to JSON as they are."""
    for name in ints:
        object.__setattr__(obj, name, int(getattr(obj, name)))
    for name in floats:
        if getattr(obj, name) is not None:
            object.__setattr__(obj, name, float(getattr(obj, name)))
