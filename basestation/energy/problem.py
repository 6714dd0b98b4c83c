"""The precision problem: an energy model, the convergence bound and a target, evaluated on any grid.

An energy model gives, per device, the joules of one local iteration at
training precision n and of one uplink at m bits per value. The problem weighs
devices by their sampling probability q_k and puts the pieces together:

    E_total(I, K, m, n) = T(I, K, m, n) * K * (I * E_train(n) + E_comm(m))

with E_train and E_comm the q-weighted means over devices (the paper's
sum_k q_k E_comm,k). Every method broadcasts over numpy arrays.

    >>> from basestation.energy.presets import kim2022
    >>> problem = kim2022().problem(epsilon=0.1)
    >>> problem.setting(1, 5, 17, 17).rounds > problem.setting(1, 5, 32, 32).rounds
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from numpy.typing import ArrayLike

from basestation.energy import kim2022
from basestation.energy.kim2022 import N_MAX, ConvergenceConstants


class SolveError(ValueError):
    """The problem has no feasible precision (e.g. epsilon below what 32 bits can reach) or bad bounds."""


class EnergyModel(Protocol):
    """Per-device energy of one local iteration and one uplink, as functions of precision."""

    @property
    def d(self) -> int:
        """Number of model parameters (values sent per uplink)."""

    @property
    def devices(self) -> tuple[str, ...]:
        """Device names, in the order of the arrays returned below."""

    def train_energy(self, n: ArrayLike) -> np.ndarray:
        """Joules of one local iteration at precision ``n``, shape ``(N,) + shape(n)``."""

    def uplink_energy(self, m: ArrayLike) -> np.ndarray:
        """Joules of one uplink at ``m`` bits per value, shape ``(N,) + shape(m)``."""


@dataclass(frozen=True)
class Setting:
    """One point of the problem: local iterations ``I``, devices per round ``K``, uplink bits ``m``,
    training bits ``n``, with its total energy and rounds to the target.

    ``m_per_device`` is set when devices use different uplink precisions
    (``m`` is then the most common one).
    """

    I: int  # noqa: E741 - the paper's symbol
    K: int
    m: int
    n: int
    energy_j: float
    rounds: float
    m_per_device: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (infinite values become ``None``)."""
        out: dict[str, Any] = {"I": self.I, "K": self.K, "m": self.m, "n": self.n,
                               "energy_j": _finite(self.energy_j), "rounds": _finite(self.rounds)}
        if self.m_per_device is not None:
            out["m_per_device"] = dict(self.m_per_device)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Setting":
        """Inverse of ``to_dict``."""
        m_map = data.get("m_per_device")
        return cls(I=int(data["I"]), K=int(data["K"]), m=int(data["m"]), n=int(data["n"]),
                   energy_j=_float_or_inf(data.get("energy_j")), rounds=_float_or_inf(data.get("rounds")),
                   m_per_device=None if m_map is None else {str(k): int(v) for k, v in m_map.items()})


class Problem:
    """Energy model + convergence constants + target optimality gap ``epsilon``.

    The energy model and the constants must describe the same devices (one
    sigma per device). Rounds are clipped at 0 (a bound that holds from the
    start needs no round) and are ``inf`` below ``n_min``.
    """

    def __init__(self, energy: EnergyModel, convergence: ConvergenceConstants, epsilon: float, *,
                 name: str = "") -> None:
        if len(energy.devices) != convergence.devices:
            raise ValueError(f"energy model has {len(energy.devices)} devices but the convergence constants "
                             f"have {convergence.devices} sigma values; give one per device")
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon (the target optimality gap) must be a positive number, got {epsilon!r}")
        self.energy = energy
        self.convergence = convergence
        self.epsilon = float(epsilon)
        self.name = name
        self.weights = convergence.sampling_probabilities()

    def __repr__(self) -> str:
        return (f"Problem({self.name or type(self.energy).__name__}, d={self.d}, N={self.devices}, "
                f"epsilon={self.epsilon:g})")

    @property
    def d(self) -> int:
        """Number of model parameters."""
        return int(self.energy.d)

    @property
    def devices(self) -> int:
        """N, the number of devices (the upper bound of K)."""
        return len(self.energy.devices)

    def n_min(self) -> int:
        """Smallest training precision with a finite number of rounds."""
        return kim2022.n_min(self.d, self.convergence, self.epsilon)

    def feasible_n(self) -> np.ndarray:
        """Training precisions n_min..32; raises ``SolveError`` when there are none."""
        lo = self.n_min()
        if lo > N_MAX:
            raise SolveError(f"epsilon={self.epsilon:g} is below what {N_MAX}-bit training can reach "
                             f"(n_min={lo}); ask for a larger epsilon")
        return np.arange(lo, N_MAX + 1)

    def train_energy(self, n: ArrayLike) -> np.ndarray:
        """q-weighted mean joules of one local iteration at precision ``n``."""
        return np.tensordot(self.weights, self.energy.train_energy(n), axes=1)

    def uplink_energy(self, m: ArrayLike) -> np.ndarray:
        """q-weighted mean joules of one uplink at ``m`` bits per value."""
        return np.tensordot(self.weights, self.energy.uplink_energy(m), axes=1)

    def phase_energy(self) -> float:
        """q-weighted mean joules a round's training costs beyond its iterations.

        Only energy models that measure it have it (``TestbedEnergy.phase_energy``); 0 for the others.
        """
        per_device = getattr(self.energy, "phase_energy", None)
        return 0.0 if per_device is None else float(np.dot(self.weights, per_device()))

    def device_round_energy(self, local_iters: ArrayLike, train_j: ArrayLike, uplink_j: ArrayLike) -> np.ndarray:
        """Joules of one device's round: I E_train + E_phase + E_comm (broadcast over the arguments)."""
        return np.asarray(local_iters) * train_j + self.phase_energy() + uplink_j

    def rounds(self, local_iters: ArrayLike, devices: ArrayLike, m: ArrayLike, n: ArrayLike) -> np.ndarray:
        """T(I, K, m, n), clipped at 0, ``inf`` where infeasible."""
        t = kim2022.rounds(local_iters, devices, m, n, self.d, self.convergence, self.epsilon)
        return np.maximum(t, 0.0)

    def round_energy(self, local_iters: ArrayLike, devices: ArrayLike, m: ArrayLike, n: ArrayLike) -> np.ndarray:
        """Joules of one round: K (I E_train(n) + E_phase + E_comm(m))."""
        return np.asarray(devices, dtype=float) * self.device_round_energy(local_iters, self.train_energy(n),
                                                                           self.uplink_energy(m))

    def total_energy(self, local_iters: ArrayLike, devices: ArrayLike, m: ArrayLike, n: ArrayLike) -> np.ndarray:
        """E_total(I, K, m, n) = T * K (I E_train(n) + E_phase + E_comm(m)); ``inf`` where infeasible."""
        t = self.rounds(local_iters, devices, m, n)
        per_round = self.round_energy(local_iters, devices, m, n)
        return np.where(np.isfinite(t), t * per_round, np.inf)

    def setting(self, local_iters: int, devices: int, m: int, n: int) -> Setting:
        """Evaluate one point."""
        self._check_point(local_iters, devices, m, n)
        return Setting(I=int(local_iters), K=int(devices), m=int(m), n=int(n),
                       energy_j=float(self.total_energy(local_iters, devices, m, n)),
                       rounds=float(self.rounds(local_iters, devices, m, n)))

    def setting_per_device(self, local_iters: int, devices: int, n: int, m_per_device: Sequence[int]) -> Setting:
        """Evaluate a point where device k sends at ``m_per_device[k]`` bits.

        The uplink energy is sum_k q_k E_comm,k(m_k) and the bound sees the
        effective m whose 2^(-2m) is the q-weighted mean of 2^(-2 m_k).
        """
        m_arr = np.asarray(m_per_device, dtype=int)
        if m_arr.shape != (self.devices,):
            raise ValueError(f"m_per_device needs {self.devices} values (one per device), got shape {m_arr.shape}")
        for m in m_arr:
            self._check_point(local_iters, devices, int(m), n)
        m_eff = kim2022.effective_uplink_bits(m_arr, self.weights)
        t = float(self.rounds(local_iters, devices, m_eff, n))
        per_device = self.energy.uplink_energy(np.arange(1, N_MAX + 1))   # (N, 32)
        uplink = float(np.sum(self.weights * per_device[np.arange(self.devices), m_arr - 1]))
        per_round = devices * float(self.device_round_energy(local_iters, float(self.train_energy(n)), uplink))
        values, counts = np.unique(m_arr, return_counts=True)
        return Setting(I=int(local_iters), K=int(devices), m=int(values[np.argmax(counts)]), n=int(n),
                       energy_j=t * per_round if math.isfinite(t) else math.inf, rounds=t,
                       m_per_device={name: int(m) for name, m in zip(self.energy.devices, m_arr)})

    def _check_point(self, local_iters: int, devices: int, m: int, n: int) -> None:
        if not (isinstance(local_iters, (int, np.integer)) and local_iters >= 1):
            raise ValueError(f"local iterations I must be an integer >= 1, got {local_iters!r}")
        if not (isinstance(devices, (int, np.integer)) and 1 <= devices <= self.devices):
            raise ValueError(f"devices per round K must be an integer in 1..{self.devices}, got {devices!r}")
        for label, bits in (("uplink precision m", m), ("training precision n", n)):
            if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= N_MAX):
                raise ValueError(f"{label} must be an integer in 1..{N_MAX}, got {bits!r}")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _float_or_inf(value: Any) -> float:
    return math.inf if value is None else float(value)
