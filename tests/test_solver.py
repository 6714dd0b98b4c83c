"""Solvers: the ICC line search, the joint integer grid, the Pareto front, Nash bargaining, per-device m."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from basestation.energy import solver
from basestation.energy.kim2022 import KIM2022_HARDWARE, ConvergenceConstants, Kim2022Energy
from basestation.energy.presets import kim2022
from basestation.energy.problem import Problem, Setting, SolveError

PROBLEM = kim2022().problem(epsilon=0.1)


@pytest.fixture(scope="module")
def grid() -> solver.Grid:
    return solver.evaluate_grid(PROBLEM)


def test_icc_line_search_ties_n_and_m():
    best = solver.tied_line_search(PROBLEM, local_iters=1, devices=5)
    baseline = PROBLEM.setting(1, 5, 32, 32)
    assert (best.n, best.m, best.I, best.K) == (17, 17, 1, 5)
    assert 1 - best.energy_j / baseline.energy_j == pytest.approx(0.35, abs=0.03)


def test_tied_curve_covers_n_min_to_32():
    curve = solver.tied_curve(PROBLEM, local_iters=1, devices=5)
    assert [s.n for s in curve] == list(range(15, 33))
    assert all(s.n == s.m for s in curve)


def test_joint_integer_optimum_and_saving(grid):
    best = grid.best()
    baseline = solver.best_full_precision(PROBLEM)
    assert (best.I, best.K, best.m, best.n) == (1, 1, 11, 18)
    assert (baseline.m, baseline.n) == (32, 32)
    assert 1 - best.energy_j / baseline.energy_j == pytest.approx(0.46, abs=0.03)
    assert solver.joint_search(PROBLEM) == best


def test_grid_matches_pointwise_evaluation(grid):
    rng = np.random.default_rng(0)
    for _ in range(25):
        idx = tuple(int(rng.integers(0, size)) for size in grid.energy.shape)
        point = grid.setting(idx)
        again = PROBLEM.setting(point.I, point.K, point.m, point.n)
        assert again.energy_j == pytest.approx(point.energy_j, rel=1e-12)
        assert again.rounds == pytest.approx(point.rounds, rel=1e-12)


def test_grid_axes_can_be_fixed_and_are_checked():
    g = solver.evaluate_grid(PROBLEM, local_iters=5, devices=[2, 3], m=[8, 16])
    assert g.energy.shape == (1, 2, 2, 18)
    with pytest.raises(ValueError, match="devices per round K must lie in 1..50"):
        solver.evaluate_grid(PROBLEM, devices=[0, 60])
    with pytest.raises(ValueError, match="local iterations I must be an integer"):
        solver.evaluate_grid(PROBLEM, local_iters=[1.5])


def test_unreachable_target_is_a_solve_error():
    with pytest.raises(SolveError, match="n_min=34"):
        solver.joint_search(kim2022().problem(epsilon=1e-12))


points = hnp.arrays(np.float64, st.integers(1, 60),
                    elements=st.one_of(st.integers(0, 6).map(float), st.floats(0, 100)))


@given(st.data())
@settings(max_examples=200)
def test_pareto_mask_is_exactly_the_non_dominated_set(data):
    energy = data.draw(points)
    rounds = data.draw(hnp.arrays(np.float64, energy.shape,
                                  elements=st.one_of(st.integers(0, 6).map(float), st.floats(0, 100))))
    mask = solver.pareto_mask(energy, rounds)
    front = np.nonzero(mask)[0]
    assert front.size >= 1
    for i in front:                     # nothing dominates a front point
        dominated = (energy <= energy[i]) & (rounds <= rounds[i]) & ((energy < energy[i]) | (rounds < rounds[i]))
        assert not dominated.any()
    for j in range(energy.size):        # every point is dominated by or equal to a front point
        assert np.any((energy[front] <= energy[j]) & (rounds[front] <= rounds[j]))
    pairs = {(energy[i], rounds[i]) for i in front}
    assert len(pairs) == front.size     # duplicates appear once


def test_pareto_mask_ignores_infinite_points():
    mask = solver.pareto_mask([1.0, np.inf, 0.5], [np.inf, 0.1, 2.0])
    assert mask.tolist() == [False, False, True]


def test_pareto_front_of_the_preset_dominates_the_whole_grid(grid):
    front = solver.pareto_front(grid)
    e = np.array([s.energy_j for s in front])
    t = np.array([s.rounds for s in front])
    assert np.all(np.diff(e) > 0) and np.all(np.diff(t) < 0)
    assert front[0] == grid.best()
    flat_e, flat_t = grid.energy.ravel(), grid.rounds.ravel()
    finite = np.isfinite(flat_e)
    # The front point with the largest energy not above a grid point's has the fewest rounds among those.
    at = np.searchsorted(e, flat_e[finite], side="right") - 1
    assert np.all(at >= 0)
    assert np.all(t[at] <= flat_t[finite])


def test_nash_bargaining_maximises_the_product_over_the_front(grid):
    front = solver.pareto_front(grid)
    e_d, t_d = solver.nadir(front)
    pick = solver.nash_bargaining(front)
    products = [(e_d - s.energy_j) * (t_d - s.rounds) for s in front]
    assert pick in front
    assert (e_d - pick.energy_j) * (t_d - pick.rounds) == pytest.approx(max(products))
    assert front[0].energy_j < pick.energy_j < front[-1].energy_j


def test_nash_bargaining_with_a_given_disagreement_point():
    front = [Setting(1, 1, 8, 8, 1.0, 10.0), Setting(1, 1, 9, 9, 2.0, 6.0), Setting(1, 1, 10, 10, 6.0, 1.0)]
    assert solver.nash_bargaining(front, (7.0, 11.0)).m == 9       # products 6*1, 5*5, 1*10
    assert solver.nash_bargaining(front, (20.0, 11.0)).m == 10     # products 19*1, 18*5, 14*10
    assert solver.nash_bargaining(front, (3.0, 30.0)).m == 8       # only energies below 3: 2*20, 1*24
    assert solver.nash_bargaining(front[:1]) == front[0]
    with pytest.raises(ValueError, match="empty"):
        solver.nash_bargaining([])


def test_per_device_uplink_gives_costly_links_fewer_bits():
    cheap, costly = 1e-10, 1e-7
    jpb = np.array([cheap] * 5 + [costly] * 5)
    energy = Kim2022Energy(KIM2022_HARDWARE, jpb)
    conv = ConvergenceConstants(L=0.097, mu=0.05, G=0.25, Gamma=0.6, rho=100.0, sigma=tuple([1e-8] * 10))
    problem = Problem(energy, conv, 0.1)
    common = solver.joint_search(problem, local_iters=[1], devices=[5])
    mixed = solver.per_device_uplink(problem, common)
    m = mixed.m_per_device
    assert all(m[f"device-{k}"] > m[f"device-{k + 5}"] for k in range(5))
    assert mixed.energy_j < common.energy_j


def test_settings_round_trip_through_dicts():
    s = Setting(1, 2, 3, 4, 5.0, float("inf"), m_per_device={"a": 3})
    assert s.to_dict()["rounds"] is None
    assert Setting.from_dict(s.to_dict()) == s
