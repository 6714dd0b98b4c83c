"""Solvers for the precision problem: the ICC line search, the journal's joint integer search, the
energy/rounds Pareto front and a Nash bargaining pick.

- ``tied_line_search``: ICC 2022, one precision n = m over n_min..32 with I and K fixed.
- ``joint_search``: the journal's problem over 1 <= I <= 30, 1 <= K <= N,
  1 <= m <= 32, n_min <= n <= 32, solved exactly by evaluating the whole
  integer grid with numpy broadcasting (the journal uses alternating
  optimisation; the exact grid is cheap enough here).
- ``pareto_front``: every non-dominated integer point in (energy, rounds),
  by exact enumeration (the journal uses normal boundary inspection).
- ``nash_bargaining``: the front point maximising (E_d - E)(T_d - T); the
  disagreement point (E_d, T_d) defaults to the nadir of the front, the worst
  energy and the worst rounds among its points (docs/precision.md).

    >>> from basestation.energy.presets import kim2022
    >>> from basestation.energy.solver import joint_search
    >>> best = joint_search(kim2022().problem(epsilon=0.1))
    >>> (best.I, best.K, best.m, best.n)
    (1, 1, 11, 18)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from basestation.energy.kim2022 import N_MAX
from basestation.energy.problem import Problem, Setting, SolveError

MAX_LOCAL_ITERS = 30


@dataclass(frozen=True)
class Grid:
    """Total energy and rounds on the integer grid I x K x m x n (arrays of shape (|I|, |K|, |m|, |n|))."""

    local_iters: np.ndarray
    devices: np.ndarray
    m: np.ndarray
    n: np.ndarray
    energy: np.ndarray
    rounds: np.ndarray

    def setting(self, index: tuple[int, int, int, int]) -> Setting:
        """The grid point at ``index`` (one index per axis)."""
        i, k, a, b = index
        return Setting(I=int(self.local_iters[i]), K=int(self.devices[k]), m=int(self.m[a]), n=int(self.n[b]),
                       energy_j=float(self.energy[index]), rounds=float(self.rounds[index]))

    def best(self) -> Setting:
        """The point of least total energy (the first one on ties, in I, K, m, n order)."""
        if not np.any(np.isfinite(self.energy)):
            raise SolveError("no grid point reaches the target (every point needs infinitely many rounds)")
        flat = int(np.argmin(self.energy))
        return self.setting(np.unravel_index(flat, self.energy.shape))


def evaluate_grid(problem: Problem, *, local_iters: ArrayLike | None = None, devices: ArrayLike | None = None,
                  m: ArrayLike | None = None, n: ArrayLike | None = None) -> Grid:
    """Energy and rounds of every (I, K, m, n) combination, in one broadcast evaluation.

    Defaults are the journal's bounds: I in 1..30, K in 1..N, m in 1..32,
    n in n_min..32. Pass a sequence (or one integer) to restrict an axis.
    """
    i_ax = _axis("local iterations I", local_iters, MAX_LOCAL_ITERS)
    k_ax = _axis("devices per round K", devices, problem.devices)
    m_ax = _axis("uplink precision m", m, N_MAX)
    n_ax = _axis("training precision n", n, N_MAX) if n is not None else problem.feasible_n()
    ii = i_ax[:, None, None, None]
    kk = k_ax[None, :, None, None]
    mm = m_ax[None, None, :, None]
    nn = n_ax[None, None, None, :]
    rounds = problem.rounds(ii, kk, mm, nn)
    train = problem.train_energy(n_ax)[None, None, None, :]
    uplink = problem.uplink_energy(m_ax)[None, None, :, None]
    per_round = kk * problem.device_round_energy(ii, train, uplink)
    with np.errstate(invalid="ignore"):
        energy = np.where(np.isfinite(rounds), rounds * per_round, np.inf)
    return Grid(local_iters=i_ax, devices=k_ax, m=m_ax, n=n_ax, energy=energy, rounds=rounds)


def tied_curve(problem: Problem, *, local_iters: int, devices: int) -> list[Setting]:
    """Every tied precision n = m from n_min to 32 at fixed I and K (the ICC line search's candidates)."""
    n_ax = problem.feasible_n()
    problem.setting(local_iters, devices, N_MAX, N_MAX)       # validates I and K
    energy = problem.total_energy(local_iters, devices, n_ax, n_ax)
    rounds = problem.rounds(local_iters, devices, n_ax, n_ax)
    return [Setting(I=int(local_iters), K=int(devices), m=int(b), n=int(b), energy_j=float(e), rounds=float(t))
            for b, e, t in zip(n_ax, energy, rounds)]


def tied_line_search(problem: Problem, *, local_iters: int, devices: int) -> Setting:
    """ICC 2022: the tied precision n = m of least total energy at fixed I and K."""
    curve = tied_curve(problem, local_iters=local_iters, devices=devices)
    return min(curve, key=lambda s: s.energy_j)


def joint_search(problem: Problem, **axes: ArrayLike | None) -> Setting:
    """The (I, K, m, n) of least total energy over the grid (``evaluate_grid`` axes may be restricted)."""
    return evaluate_grid(problem, **axes).best()


def best_full_precision(problem: Problem, *, local_iters: ArrayLike | None = None,
                        devices: ArrayLike | None = None) -> Setting:
    """The baseline: n = m = 32 with the best I and K (or the given ones)."""
    return evaluate_grid(problem, local_iters=local_iters, devices=devices, m=[N_MAX], n=[N_MAX]).best()


def pareto_mask(energy: ArrayLike, rounds: ArrayLike) -> np.ndarray:
    """Boolean mask (same shape) of the points no other point dominates in (energy, rounds), both minimised.

    Of several identical points only the first (in flattened order) is kept;
    points with a non-finite coordinate are never on the front.

        >>> pareto_mask([3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.5]).tolist()
        [True, True, True, False]
    """
    e = np.asarray(energy, dtype=float)
    t = np.asarray(rounds, dtype=float)
    if e.shape != t.shape:
        raise ValueError(f"energy and rounds must have the same shape, got {e.shape} and {t.shape}")
    flat_e, flat_t = e.ravel(), t.ravel()
    finite = np.nonzero(np.isfinite(flat_e) & np.isfinite(flat_t))[0]
    order = finite[np.lexsort((flat_t[finite], flat_e[finite]))]     # by energy, then rounds; stable
    sorted_t = flat_t[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(sorted_t)[:-1]])
    mask = np.zeros(flat_e.size, dtype=bool)
    mask[order[sorted_t < best_before]] = True
    return mask.reshape(e.shape)


def pareto_front(problem_or_grid: Problem | Grid, **axes: ArrayLike | None) -> list[Setting]:
    """Every non-dominated (energy, rounds) grid point, by increasing energy (decreasing rounds)."""
    grid = problem_or_grid if isinstance(problem_or_grid, Grid) else evaluate_grid(problem_or_grid, **axes)
    mask = pareto_mask(grid.energy, grid.rounds)
    points = [grid.setting(tuple(int(v) for v in idx)) for idx in np.argwhere(mask)]
    return sorted(points, key=lambda s: (s.energy_j, s.rounds))


def nadir(front: Sequence[Setting]) -> tuple[float, float]:
    """The worst energy and the worst rounds among the front's points."""
    if not front:
        raise ValueError("the Pareto front is empty")
    return max(s.energy_j for s in front), max(s.rounds for s in front)


def nash_bargaining(front: Sequence[Setting], disagreement: tuple[float, float] | None = None) -> Setting:
    """The front point maximising (E_d - E)(T_d - T) over the points better than (E_d, T_d) in both.

    ``disagreement`` defaults to ``nadir(front)``. With no point strictly
    better than it in both objectives, the least-energy point is returned.
    """
    if not front:
        raise ValueError("the Pareto front is empty")
    e_d, t_d = nadir(front) if disagreement is None else disagreement
    if not (math.isfinite(e_d) and math.isfinite(t_d)):
        raise ValueError(f"the disagreement point must be finite, got {(e_d, t_d)!r}")
    best, best_gain = min(front, key=lambda s: s.energy_j), 0.0
    for s in sorted(front, key=lambda s: s.energy_j):
        gain = (e_d - s.energy_j) * (t_d - s.rounds)
        if s.energy_j < e_d and s.rounds < t_d and gain > best_gain:
            best, best_gain = s, gain
    return best


def per_device_uplink(problem: Problem, setting: Setting, *, max_sweeps: int = 20) -> Setting:
    """Give each device its own uplink precision m_k, by coordinate descent on the total energy from ``setting``.

    Devices with a costly uplink end up sending fewer bits; the bound sees the
    effective m of the mix (``kim2022.effective_uplink_bits``). Each sweep
    tries every m_k in 1..32 for each device in turn, until nothing changes.
    """
    q = problem.weights
    table = problem.energy.uplink_energy(np.arange(1, N_MAX + 1))           # (N, 32) joules per uplink
    candidates = np.arange(1, N_MAX + 1)
    res_c = np.exp2(-2.0 * candidates)
    m_vec = np.full(problem.devices, setting.m, dtype=int)
    train = float(problem.train_energy(setting.n))
    i_, k_ = setting.I, setting.K
    for _ in range(max_sweeps):
        changed = False
        for k in range(problem.devices):
            resolution = float(np.sum(q * np.exp2(-2.0 * m_vec)))
            uplink = float(np.sum(q * table[np.arange(problem.devices), m_vec - 1]))
            res_try = resolution - q[k] * 2.0 ** (-2.0 * m_vec[k]) + q[k] * res_c
            up_try = uplink - q[k] * table[k, m_vec[k] - 1] + q[k] * table[k]
            m_eff = -0.5 * np.log2(np.maximum(res_try, np.finfo(float).tiny))
            rounds = problem.rounds(i_, k_, m_eff, setting.n)
            with np.errstate(invalid="ignore"):
                energy = np.where(np.isfinite(rounds), rounds * k_ * problem.device_round_energy(i_, train, up_try),
                                  np.inf)
            choice = int(candidates[int(np.argmin(energy))])
            if choice != m_vec[k] and energy[choice - 1] < energy[m_vec[k] - 1] * (1 - 1e-12):
                m_vec[k] = choice
                changed = True
        if not changed:
            break
    return problem.setting_per_device(i_, k_, setting.n, m_vec)


def _axis(name: str, values: ArrayLike | None, high: int) -> np.ndarray:
    """One grid axis: 1..high by default, else the given integers, checked to lie in 1..high."""
    if values is None:
        return np.arange(1, high + 1)
    arr = np.atleast_1d(np.asarray(values))
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer or a non-empty sequence of integers, got {values!r}")
    if arr.min() < 1 or arr.max() > high:
        raise ValueError(f"{name} must lie in 1..{high}, got values {int(arr.min())}..{int(arr.max())}")
    return arr.astype(int)
