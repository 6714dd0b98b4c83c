"""The paper's energy model and bound (basestation.energy.kim2022, channel, problem, presets, testbed model)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from basestation.energy import kim2022
from basestation.energy.channel import ChannelConstants, average_joules_per_bit, rate
from basestation.energy.kim2022 import KIM2022_HARDWARE as HW
from basestation.energy.kim2022 import ConvergenceConstants
from basestation.energy.presets import kim2022 as kim2022_preset
from basestation.energy import presets
from basestation.energy.presets import kim2022_sigma
from basestation.energy.problem import Problem
from basestation.energy.records import EnergyRecord, RoundStats
from basestation.energy import testbed_model
from basestation.energy.testbed_model import DeviceEnergyParams
from models import counts, get_architecture

PRESET = kim2022_preset()
CONV = PRESET.convergence
D = HW.d


def _beta_mu_root(eps: float) -> float:
    """The real n at which the bound's slack 2 eps / L - beta Psi1 / (beta mu - 1) reaches 0."""
    beta = CONV.step_beta
    return 0.5 * math.log2(CONV.L * beta * D * (CONV.rho - CONV.mu) / (2 * eps * (beta * CONV.mu - 1)))


def test_n_min_of_the_released_constants():
    assert [PRESET.n_min(eps) for eps in (0.1, 0.01, 0.001)] == [15, 17, 19]


def test_sigma_package_data_has_fifty_positive_values():
    sigma = kim2022_sigma()
    assert len(sigma) == 50
    assert all(0 < s < 1e-6 for s in sigma)
    assert sigma[0] == pytest.approx(3.849331164929026e-08)


@pytest.mark.parametrize("sram", [16e6, 4e6])      # the released SRAM holds the model; 4 Mbit makes it spill
def test_train_energy_matches_a_term_by_term_evaluation(sram):
    hw = replace(HW, sram_bits=sram)

    def by_hand(n: float) -> float:
        a = 3.7e-12
        e_mac = a * (n / 32) ** 1.25
        reuse = 40.5e6 * math.sqrt(n / (16 * 32))
        inference = (e_mac * 40.5e6 + 2 * 4990 * a                      # compute
                     + 2 * e_mac * 411598 + e_mac * reuse               # weights
                     + 2 * 2 * e_mac * 4990 + e_mac * reuse             # activations
                     + 150 * a * 784 + 2 * 150 * e_mac * max(411598 * n + 2 * 4990 * n - sram, 0))
        backward = (2 * a * 40.5e6 + 8 * a * a * 4990 * 411598 + 2 * a * 40.5e6 * math.sqrt(1 / 16)
                    + 150 * a * max(32 * 411598 + 64 * 4990 - sram, 0))
        return 32 * (inference + backward)

    for n in (8, 16, 32):
        assert float(kim2022.train_energy(n, hw)) == pytest.approx(by_hand(n), rel=1e-12)
    assert float(kim2022.train_energy(32, HW)) == pytest.approx(0.0193, abs=5e-5)


@given(st.floats(1.0, 31.0), st.floats(0.01, 1.0))
def test_train_energy_rises_with_precision(n, step):
    assert kim2022.train_energy(n + step, HW) > kim2022.train_energy(n, HW)


@given(st.integers(1, 32), st.integers(1, 32), st.floats(1e-12, 1e-3))
def test_uplink_energy_is_linear_in_m(m1, m2, jpb):
    e = lambda m: float(kim2022.uplink_energy(m, D, jpb))  # noqa: E731
    assert e(m1 + m2) == pytest.approx(e(m1) + e(m2), rel=1e-12)
    assert e(m1) == pytest.approx(m1 * e(1), rel=1e-12)
    assert e(m1) == pytest.approx(m1 * D * jpb, rel=1e-12)


@given(st.floats(1e-4, 10.0), st.integers(1, 30), st.integers(1, 50), st.integers(1, 32))
@settings(max_examples=60)
def test_rounds_grow_without_bound_as_n_falls_to_its_floor(eps, local_iters, devices, m):
    root = _beta_mu_root(eps)
    steps = [10.0 ** -k for k in range(1, 13)]
    t = [float(kim2022.rounds(local_iters, devices, m, root + h, D, CONV, eps)) for h in steps]
    assert all(b > a for a, b in zip(t, t[1:]))
    assert t[-1] > 1e9
    assert math.isinf(float(kim2022.rounds(local_iters, devices, m, root - 1e-6, D, CONV, eps)))


@given(st.floats(1e-4, 10.0), st.integers(1, 30), st.integers(1, 50), st.integers(1, 32))
@settings(max_examples=60)
def test_n_min_is_the_first_finite_precision(eps, local_iters, devices, m):
    lowest = kim2022.n_min(D, CONV, eps)
    assert math.isfinite(float(kim2022.rounds(local_iters, devices, m, lowest, D, CONV, eps)))
    if lowest > 1:
        assert math.isinf(float(kim2022.rounds(local_iters, devices, m, lowest - 1, D, CONV, eps)))
    ns = np.arange(lowest, 33)
    t = kim2022.rounds(local_iters, devices, m, ns, D, CONV, eps)
    assert np.all(np.diff(t) <= 0)          # more training bits never need more rounds


def test_rounds_formula_against_the_bound_it_inverts():
    # E[F] - F* <= (L/2) [beta^2 Psi2 / ((beta mu - 1)(I T + gamma)) + beta Psi1 / (beta mu - 1)] = eps at T.
    i, k, m, n, eps = 3, 7, 9, 20, 0.05
    t = float(kim2022.rounds(i, k, m, n, D, CONV, eps))
    beta = CONV.step_beta
    bound = (CONV.L / 2) * (beta ** 2 * float(kim2022.psi2(i, k, m, D, CONV)) / ((beta * CONV.mu - 1) * (i * t + 1))
                            + beta * float(kim2022.psi1(n, D, CONV)) / (beta * CONV.mu - 1))
    assert bound == pytest.approx(eps, rel=1e-9)


def test_sampling_is_inverse_variance_by_default():
    q = CONV.sampling_probabilities()
    sigma = np.array(CONV.sigma)
    assert q.sum() == pytest.approx(1.0)
    assert np.allclose(q * sigma ** 2, q[0] * sigma[0] ** 2)


def test_channel_rate_is_shannon():
    ch = ChannelConstants()
    snr_one = ch.Bw * ch.N0 / ch.P          # gain giving P h / (Bw N0) = 1
    assert float(rate(np.array(snr_one), ch)) == pytest.approx(ch.Bw)
    assert float(rate(np.array(3 * snr_one), ch)) == pytest.approx(2 * ch.Bw)


def test_channel_average_is_seeded_and_plausible():
    ch = ChannelConstants()
    a = average_joules_per_bit(ch, 50, seed=0)
    b = average_joules_per_bit(ch, 50, seed=0)
    c = average_joules_per_bit(ch, 50, seed=1)
    assert a.shape == (50,)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # P / R for a device at the far corner with unit gain bounds the typical cost from below.
    far = ch.P / float(rate(np.array(1.0 * (500 * math.sqrt(2)) ** -4), ch))
    assert np.all(a > 0.1 * far)
    assert 1e-9 < float(np.mean(a)) < 1e-7


def test_channel_rejects_bad_constants():
    with pytest.raises(ValueError, match="P must be a positive number"):
        ChannelConstants(P=0.0)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        average_joules_per_bit(ChannelConstants(), 0)


def test_total_energy_is_rounds_times_round_energy():
    problem = PRESET.problem(0.1)
    s = problem.setting(2, 4, 10, 20)
    train = float(kim2022.train_energy(20, HW))
    uplink = float(np.dot(problem.weights, PRESET.energy.uplink_energy(10)))
    assert s.energy_j == pytest.approx(s.rounds * (2 * 4 * train + 4 * uplink), rel=1e-12)


def test_convergence_constants_are_checked():
    sigma = (0.1, 0.2)
    with pytest.raises(ValueError, match="mu must be a positive number"):
        ConvergenceConstants(L=1.0, mu=0.0, G=1.0, Gamma=0.0, rho=1.0, sigma=sigma)
    with pytest.raises(ValueError, match="2 probabilities"):
        ConvergenceConstants(L=1.0, mu=0.1, G=1.0, Gamma=0.0, rho=1.0, sigma=sigma, sampling=(1.0,))
    with pytest.raises(ValueError, match="beta \\* mu > 1"):
        ConvergenceConstants(L=1.0, mu=0.1, G=1.0, Gamma=0.0, rho=1.0, sigma=sigma, beta=5.0)


def test_problem_checks_its_parts_and_points():
    with pytest.raises(ValueError, match="50 devices but the convergence constants have 2"):
        Problem(PRESET.energy, ConvergenceConstants(L=1.0, mu=0.1, G=1.0, Gamma=0.0, rho=1.0, sigma=(1.0, 1.0)), 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        PRESET.problem(-0.1)
    problem = PRESET.problem(0.1)
    with pytest.raises(ValueError, match="devices per round K must be an integer in 1..50"):
        problem.setting(1, 51, 8, 8)
    with pytest.raises(ValueError, match="uplink precision m must be an integer in 1..32"):
        problem.setting(1, 1, 0, 8)


def test_per_device_uplink_setting_matches_the_common_one_when_all_equal():
    problem = PRESET.problem(0.1)
    common = problem.setting(1, 5, 12, 18)
    mixed = problem.setting_per_device(1, 5, 18, [12] * 50)
    assert mixed.energy_j == pytest.approx(common.energy_j, rel=1e-12)
    assert mixed.rounds == pytest.approx(common.rounds, rel=1e-12)


def test_testbed_energy_follows_its_formulas():
    c = counts(get_architecture("mlp"))
    p = DeviceEnergyParams(fixed_j=1e-3, joules_per_mac=2e-9, alpha=1.5, joules_per_bit=3e-8, joules_per_message=4e-3,
                           train_table={16: 0.5})
    model = testbed_model.TestbedEnergy(c, {"a": p}, batch_size=16, messages=2, overhead_bits=800)
    assert float(model.train_energy(8)[0]) == pytest.approx(1e-3 + 16 * c.macs * 2e-9 * (8 / 32) ** 1.5)
    assert float(model.uplink_energy(8)[0]) == pytest.approx(2 * 4e-3 + 3e-8 * (8 * c.params + 800))
    assert float(model.train_energy(16)[0]) != 0.5
    tabled = testbed_model.TestbedEnergy(c, {"a": p}, batch_size=16, use_table=True)
    assert tabled.train_energy([15, 16]).tolist()[0][1] == 0.5


def test_a_part_per_phase_is_paid_once_per_device_and_round_in_every_energy_figure():
    from basestation.energy.solver import evaluate_grid

    preset = presets.testbed("mlp", devices=2)
    with_phase = {name: replace(p, phase_j=0.25) for name, p in preset.energy.params.items()}
    phased = Problem(testbed_model.TestbedEnergy(preset.energy.counts, with_phase), preset.convergence, 0.1)
    plain = Problem(preset.energy, preset.convergence, 0.1)
    assert phased.phase_energy() == pytest.approx(0.25) and plain.phase_energy() == 0.0
    assert float(phased.round_energy(5, 2, 8, 8) - plain.round_energy(5, 2, 8, 8)) == pytest.approx(2 * 0.25)
    a, b = evaluate_grid(phased, local_iters=[5], devices=[2]), evaluate_grid(plain, local_iters=[5], devices=[2])
    finite = np.isfinite(b.energy)
    assert finite.any()
    assert np.allclose((a.energy - b.energy)[finite], (b.rounds * 2 * 0.25)[finite])
    _, _, mi, ni = np.unravel_index(np.argmin(b.energy), b.energy.shape)
    m, n = int(b.m[mi]), int(b.n[ni])
    assert phased.setting(5, 2, m, n).energy_j == pytest.approx(
        plain.setting(5, 2, m, n).energy_j + plain.setting(5, 2, m, n).rounds * 2 * 0.25)


def test_testbed_preset_uses_the_architecture_counts():
    preset = presets.testbed("cnn", devices=4)
    assert preset.energy.d == counts(get_architecture("cnn")).params
    assert preset.convergence.devices == 4
    assert preset.n_min(0.1) >= 1
    with pytest.raises(ValueError, match="unknown model"):
        presets.testbed("resnet")


def test_records_check_their_fields_and_normalise_numpy_numbers():
    r = EnergyRecord(device="pi-1", round=np.int64(2), n=np.int32(16), m=8, local_iters=5, batch_size=32,
                     train_j=np.float32(1.5), uplink_j=0.01, uplink_bits=19280)
    assert type(r.round) is int and type(r.n) is int and type(r.train_j) is float
    assert r.train_j_per_iter == pytest.approx(0.3)
    assert EnergyRecord.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="n must be an integer in 1..32, got 33"):
        EnergyRecord(device="pi-1", round=0, n=33, m=8, local_iters=1, batch_size=32, train_j=1.0, uplink_j=0.1,
                     uplink_bits=10)
    with pytest.raises(ValueError, match="train_j must be a finite number of joules"):
        EnergyRecord(device="pi-1", round=0, n=8, m=8, local_iters=1, batch_size=32, train_j=math.nan, uplink_j=0.1,
                     uplink_bits=10)
    with pytest.raises(ValueError, match="grad_variance must be a finite non-negative number"):
        RoundStats(device="pi-1", round=0, loss=1.0, grad_sq_norm=1.0, grad_variance=-1.0, samples=10, local_iters=1)
