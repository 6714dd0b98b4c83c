"""The energy model and convergence bound of Kim, Saad, Mozaffari and Debbah, as pure vectorised functions.

Sources: "On the Tradeoff between Energy, Precision, and Accuracy in Federated
Quantized Neural Networks" (ICC 2022, arXiv 2111.07911) and "Green, Quantized
Federated Learning over Wireless Networks: An Energy-Efficient Design" (IEEE
TWC, arXiv 2207.09387). The constants are the ones the authors released with
the journal version; docs/energy-model.md lists every formula with its source.

Every function broadcasts over numpy arrays (precisions, local iterations,
devices per round), so a whole search grid is one call:

    >>> from basestation.energy.kim2022 import KIM2022_HARDWARE, train_energy
    >>> round(float(train_energy(32, KIM2022_HARDWARE)), 4)   # joules per local iteration at 32 bits
    0.0193
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

N_MAX = 32


@dataclass(frozen=True)
class HardwareConstants:
    """Constants of the paper's computation energy model (one local iteration on an ASIC-like accelerator).

    ``A`` is the energy of one 32-bit MAC in joules, ``alpha`` the exponent of
    its precision scaling (Moons et al. 2017), ``A_d`` the DRAM/MAC energy
    ratio, ``p`` the number of PEs sharing a memory access, ``d``, ``N_c``,
    ``O_c``, ``x_dim`` the model's parameters, MACs, activations and input size,
    ``sram_bits`` the on-chip memory and ``batch`` the minibatch size.
    """

    A: float
    alpha: float
    A_d: float
    p: float
    d: int
    N_c: float
    O_c: float
    x_dim: float
    sram_bits: float
    batch: int


KIM2022_HARDWARE = HardwareConstants(
    A=3.7e-12, alpha=1.25, A_d=150.0, p=16.0, d=411_598, N_c=40.5e6, O_c=4990.0, x_dim=784.0,
    sram_bits=16e6, batch=32,
)


def mac_energy(n: ArrayLike, hw: HardwareConstants) -> np.ndarray:
    """E_MAC(n) = A (n / n_max)^alpha: joules of one MAC at ``n`` bits."""
    return hw.A * (np.asarray(n, dtype=float) / N_MAX) ** hw.alpha


def inference_energy(n: ArrayLike, hw: HardwareConstants) -> np.ndarray:
    """E_inf(n): joules of one forward pass of one sample at ``n`` bits (compute, weights, activations, DRAM)."""
    n = np.asarray(n, dtype=float)
    e_mac = mac_energy(n, hw)
    e_mem = 2.0 * e_mac                       # on-chip memory access
    e_dram = hw.A_d * e_mac                   # off-chip access
    reuse = hw.N_c * np.sqrt(n / (hw.p * N_MAX))
    e_comp = e_mac * hw.N_c + 2.0 * hw.O_c * hw.A
    e_weight = e_mem * hw.d + e_mac * reuse
    e_act = 2.0 * e_mem * hw.O_c + e_mac * reuse
    spill = np.maximum(hw.d * n + 2.0 * hw.O_c * n - hw.sram_bits, 0.0)
    e_dram_total = hw.A_d * hw.A * hw.x_dim + 2.0 * e_dram * spill
    return e_comp + e_weight + e_act + e_dram_total


def backward_energy(hw: HardwareConstants) -> float:
    """E_back: joules of one backward pass of one sample, always at full precision.

    The ``8 A^2 O_c d`` term is kept as the authors released it (a product where
    a sum was probably meant, which makes it negligible).
    """
    spill = max(N_MAX * hw.d + 2 * N_MAX * hw.O_c - hw.sram_bits, 0.0)
    return (2.0 * hw.A * hw.N_c + 8.0 * hw.A ** 2 * hw.O_c * hw.d
            + 2.0 * hw.A * hw.N_c * math.sqrt(1.0 / hw.p) + hw.A_d * hw.A * spill)


def train_energy(n: ArrayLike, hw: HardwareConstants) -> np.ndarray:
    """E_train(n) = B (E_inf(n) + E_back): joules of one local iteration (one minibatch) at ``n`` bits."""
    return hw.batch * (inference_energy(n, hw) + backward_energy(hw))


def uplink_energy(m: ArrayLike, d: int, joules_per_bit: ArrayLike) -> np.ndarray:
    """E_comm(m) = m d (P / R): joules to send ``d`` values of ``m`` bits at ``joules_per_bit``.

    ``joules_per_bit`` is P / R_k averaged over the channel (see
    ``basestation.energy.channel``); pass an array to get one value per device.
    """
    return np.asarray(m, dtype=float) * d * np.asarray(joules_per_bit, dtype=float)


@dataclass(frozen=True)
class ConvergenceConstants:
    """Constants of the convergence bound: smoothness ``L``, strong convexity ``mu``, gradient bound ``G``,
    heterogeneity ``Gamma``, the training-precision constant ``rho``, and the per-device minibatch gradient
    standard deviations ``sigma`` (one per device, N = len(sigma)).

    ``sampling`` gives the probability q_k of selecting each device; ``None``
    means the paper's choice q_k proportional to 1 / sigma_k^2. The step size is
    eta_t = beta / (t + gamma) with beta = 2 / mu unless ``beta`` is given.
    """

    L: float
    mu: float
    G: float
    Gamma: float
    rho: float
    sigma: tuple[float, ...]
    sampling: tuple[float, ...] | None = None
    beta: float | None = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("L", "mu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"convergence constant {name} must be a positive number, got {value!r}")
        for name in ("G", "Gamma", "rho", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"convergence constant {name} must be a non-negative number, got {value!r}")
        if len(self.sigma) < 1:
            raise ValueError("sigma needs one value per device, got none")
        if any(not (math.isfinite(s) and s >= 0) for s in self.sigma):
            raise ValueError("sigma values must be non-negative numbers")
        if self.sampling is not None:
            if len(self.sampling) != len(self.sigma):
                raise ValueError(f"sampling needs {len(self.sigma)} probabilities (one per device), "
                                 f"got {len(self.sampling)}")
            if any(q < 0 for q in self.sampling) or not math.isclose(sum(self.sampling), 1.0, rel_tol=1e-6):
                raise ValueError("sampling probabilities must be non-negative and sum to 1")
        elif any(s == 0 for s in self.sigma):
            raise ValueError("inverse-variance sampling needs every sigma > 0; pass sampling= explicitly")
        if self.step_beta * self.mu <= 1.0:
            raise ValueError(f"the bound needs beta * mu > 1, got beta={self.step_beta!r}, mu={self.mu!r}")

    @property
    def devices(self) -> int:
        """N, the number of devices."""
        return len(self.sigma)

    @property
    def step_beta(self) -> float:
        """beta of the step size schedule (2 / mu unless given)."""
        return 2.0 / self.mu if self.beta is None else self.beta

    def sampling_probabilities(self) -> np.ndarray:
        """q_k, shape (N,): the given sampling, or proportional to 1 / sigma_k^2 as in the paper."""
        if self.sampling is not None:
            return np.asarray(self.sampling, dtype=float)
        inv = 1.0 / np.asarray(self.sigma, dtype=float) ** 2
        return inv / inv.sum()


KIM2022_CONVERGENCE_SCALARS = {"L": 0.097, "mu": 0.05, "G": 0.25, "Gamma": 0.6, "rho": 100.0}


def uplink_resolution(m: ArrayLike) -> np.ndarray:
    """2^(-2m): the factor by which the m-bit uplink quantization enters the bound."""
    return np.exp2(-2.0 * np.asarray(m, dtype=float))


def effective_uplink_bits(m_per_device: ArrayLike, weights: ArrayLike) -> float:
    """The single m whose 2^(-2m) equals the q-weighted mean of 2^(-2 m_k) over devices.

    Used to put per-device uplink precisions into the bound (the quantization
    variance of the aggregate is the sampling-weighted mean of the devices').
    """
    w = np.asarray(weights, dtype=float)
    mean = float(np.sum(w * uplink_resolution(m_per_device)) / np.sum(w))
    return -0.5 * math.log2(mean)


def psi1(n: ArrayLike, d: int, c: ConvergenceConstants) -> np.ndarray:
    """Psi1(n) = d (rho - mu) / 2^(2n): the floor that training at ``n`` bits puts under the optimality gap."""
    return d * (c.rho - c.mu) * np.exp2(-2.0 * np.asarray(n, dtype=float))


def psi2(local_iters: ArrayLike, devices: ArrayLike, m: ArrayLike, d: int, c: ConvergenceConstants) -> np.ndarray:
    """Psi2(I, K, m): the variance terms of the bound.

    In order: device sampling, local drift over I iterations, uplink
    quantization, partial participation and data heterogeneity.
    """
    i = np.asarray(local_iters, dtype=float)
    k = np.asarray(devices, dtype=float)
    q = c.sampling_probabilities()
    sampling_term = float(np.sum(q ** 2 * np.asarray(c.sigma, dtype=float) ** 2))
    g2 = c.G ** 2
    return (sampling_term + 4.0 * (i - 1.0) ** 2 * g2 + 4.0 * d * i * g2 * uplink_resolution(m) / k
            + 4.0 * i ** 2 * g2 / k + 4.0 * c.L * c.Gamma)


def rounds(local_iters: ArrayLike, devices: ArrayLike, m: ArrayLike, n: ArrayLike, d: int,
           c: ConvergenceConstants, epsilon: float) -> np.ndarray:
    """T(I, K, m, n): communication rounds until the bound guarantees E[F(w_T)] - F* <= epsilon.

    Infeasible points (training precision at or below the floor, see ``n_min``)
    get ``inf``. The formula is the paper's, unclipped: a non-positive value means
    the bound holds from the start.
    """
    _check_epsilon(epsilon)
    beta = c.step_beta
    i = np.asarray(local_iters, dtype=float)
    slack = 2.0 * epsilon / c.L - beta * psi1(n, d, c) / (beta * c.mu - 1.0)
    numerator = beta ** 2 * psi2(local_iters, devices, m, d, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = numerator / (i * (beta * c.mu - 1.0) * slack) - c.gamma / i
    return np.where(slack > 0, t, np.inf)


def n_min(d: int, c: ConvergenceConstants, epsilon: float) -> int:
    """The smallest training precision for which T is finite (at least 1).

    T is finite when 2 eps / L > beta Psi1(n) / (beta mu - 1); with beta = 2 / mu
    this is the paper's ceil(0.5 log2(L beta d (rho - mu) / (2 eps))), taken as a
    strict inequality.

        >>> from basestation.energy.presets import kim2022
        >>> kim2022().n_min(0.1)
        15
    """
    _check_epsilon(epsilon)
    if c.rho <= c.mu:
        return 1
    beta = c.step_beta
    bound = c.L * beta * d * (c.rho - c.mu) / (2.0 * epsilon * (beta * c.mu - 1.0))
    if bound <= 1.0:
        return 1
    return max(1, math.floor(0.5 * math.log2(bound)) + 1)


def total_energy(rounds_: ArrayLike, local_iters: ArrayLike, devices: ArrayLike, train_j: ArrayLike,
                 uplink_j: ArrayLike) -> np.ndarray:
    """E_total = T (I K E_train + K E_comm): joules of the whole training run."""
    t = np.asarray(rounds_, dtype=float)
    i = np.asarray(local_iters, dtype=float)
    k = np.asarray(devices, dtype=float)
    return t * k * (i * np.asarray(train_j, dtype=float) + np.asarray(uplink_j, dtype=float))


def _check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon (the target optimality gap) must be a positive number, got {epsilon!r}")


class Kim2022Energy:
    """The paper's energy model as an ``EnergyModel``: the same E_train for every device and a per-device
    uplink cost ``joules_per_bit[k]`` (P / R_k averaged over the channel).

        >>> import numpy as np
        >>> model = Kim2022Energy(KIM2022_HARDWARE, np.full(3, 1e-9))
        >>> model.uplink_energy(8).shape
        (3,)
    """

    def __init__(self, hw: HardwareConstants, joules_per_bit: ArrayLike, names: tuple[str, ...] | None = None) -> None:
        jpb = np.asarray(joules_per_bit, dtype=float)
        if jpb.ndim != 1 or jpb.size < 1 or not np.all(np.isfinite(jpb)) or np.any(jpb < 0):
            raise ValueError("joules_per_bit must be a 1-D array of non-negative numbers, one per device")
        self.hw = hw
        self.joules_per_bit = jpb
        self._names = names if names is not None else tuple(f"device-{k}" for k in range(jpb.size))
        if len(self._names) != jpb.size:
            raise ValueError(f"{len(self._names)} names given for {jpb.size} devices")

    def __repr__(self) -> str:
        return f"Kim2022Energy(d={self.hw.d}, N={self.joules_per_bit.size})"

    @property
    def d(self) -> int:
        """Number of model parameters."""
        return self.hw.d

    @property
    def devices(self) -> tuple[str, ...]:
        """Device names."""
        return self._names

    def train_energy(self, n: ArrayLike) -> np.ndarray:
        """E_train(n) for every device, shape ``(N,) + shape(n)``."""
        e = train_energy(n, self.hw)
        return np.broadcast_to(e, (self.joules_per_bit.size,) + e.shape)

    def uplink_energy(self, m: ArrayLike) -> np.ndarray:
        """E_comm,k(m) for every device, shape ``(N,) + shape(m)``."""
        m = np.asarray(m, dtype=float)
        jpb = self.joules_per_bit.reshape((-1,) + (1,) * m.ndim)
        return uplink_energy(m, self.hw.d, jpb)
