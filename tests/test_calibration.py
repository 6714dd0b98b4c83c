"""Calibration from measurements: the testbed energy model from energy records, the bound's constants from
training statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from basestation.energy import testbed_model
from basestation.energy.calibration import INSUFFICIENT, Calibration, calibrate, fit_compute, fit_uplink
from basestation.energy.convergence import (compare_rounds, estimate_constants, fit_loss_curve, loss_curve,
                                            smoothness_from_secants)
from basestation.energy.kim2022 import ConvergenceConstants
from basestation.energy.records import EnergyRecord, RoundStats
from basestation.energy.testbed_model import PI4_DEFAULTS
from basestation.report.predict import Work, phase_energy
from models import counts, get_architecture

MACS = counts(get_architecture("mlp")).macs
D = counts(get_architecture("mlp")).params
TRUTH = {"fixed_j": 2e-4, "joules_per_mac": 1e-8, "alpha": 1.4, "joules_per_bit": 6e-8, "joules_per_message": 2e-3}


def synthetic(device: str, count: int, seed: int, *, noise: float = 0.02, outliers: int = 0,
              truth: dict[str, float] = TRUTH, n_values: list[int] | None = None,
              m_values: list[int] | None = None) -> list[EnergyRecord]:
    """Records of a device whose energy follows ``truth`` with multiplicative Gaussian noise (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(count):
        n = int(rng.choice(n_values)) if n_values else int(rng.integers(2, 33))
        m = int(rng.choice(m_values)) if m_values else int(rng.integers(2, 33))
        iters, batch = int(rng.integers(1, 8)), int(rng.choice([16, 32]))
        per_iter = truth["fixed_j"] + batch * MACS * truth["joules_per_mac"] * (n / 32) ** truth["alpha"]
        bits = m * D + 640
        train = iters * per_iter * (1 + noise * rng.standard_normal())
        uplink = (truth["joules_per_message"] + truth["joules_per_bit"] * bits) * (1 + noise * rng.standard_normal())
        if r < outliers:                     # e.g. a background job during training, a retransmission
            train *= 3.0
            uplink *= 2.5
        out.append(EnergyRecord(device=device, round=r, n=n, m=m, local_iters=iters, batch_size=batch,
                                train_j=train, uplink_j=uplink, uplink_bits=bits))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_parameters_from_noisy_records(seed):
    records = synthetic("pi-1", 80, seed, outliers=4)
    fit = calibrate(records, macs_per_sample=MACS).devices["pi-1"]
    assert fit.compute.ok and fit.uplink.ok
    assert fit.compute.alpha == pytest.approx(TRUTH["alpha"], abs=0.05)
    assert fit.compute.joules_per_mac == pytest.approx(TRUTH["joules_per_mac"], rel=0.05)
    assert fit.compute.fixed_j == pytest.approx(TRUTH["fixed_j"], rel=0.1)
    assert fit.uplink.joules_per_bit == pytest.approx(TRUTH["joules_per_bit"], rel=0.02)
    assert fit.uplink.joules_per_message == pytest.approx(TRUTH["joules_per_message"], rel=0.1)
    for quality in (fit.compute.quality, fit.uplink.quality):
        assert quality.points == 80
        assert quality.outliers >= 4
        assert quality.r2 > 0.95
        assert quality.mape < 0.05
    assert fit.compute.stderr["alpha"] < 0.05


def test_outliers_do_not_move_the_fit():
    clean = calibrate(synthetic("a", 80, 5), macs_per_sample=MACS).fleet
    dirty = calibrate(synthetic("a", 80, 5, outliers=8), macs_per_sample=MACS).fleet
    assert dirty.compute.alpha == pytest.approx(clean.compute.alpha, abs=0.05)
    assert dirty.uplink.joules_per_bit == pytest.approx(clean.uplink.joules_per_bit, rel=0.02)


def test_devices_are_fitted_separately_and_pooled():
    other = dict(TRUTH, alpha=0.8, joules_per_bit=2e-8)
    records = synthetic("pi-1", 60, 3) + synthetic("pi-2", 60, 4, truth=other)
    cal = calibrate(records, macs_per_sample=MACS)
    assert set(cal.devices) == {"pi-1", "pi-2"}
    assert cal.devices["pi-1"].compute.alpha == pytest.approx(1.4, abs=0.05)
    assert cal.devices["pi-2"].compute.alpha == pytest.approx(0.8, abs=0.05)
    assert cal.devices["pi-2"].uplink.joules_per_bit == pytest.approx(2e-8, rel=0.02)
    assert cal.fleet.records == 120 and cal.fleet.compute.ok


def test_too_little_data_is_reported_not_raised():
    empty = calibrate([], macs_per_sample=MACS)
    assert empty.fleet.compute.status == INSUFFICIENT
    assert empty.fleet.uplink.status == INSUFFICIENT
    two_n = synthetic("a", 10, 0, n_values=[8, 16], m_values=[8, 16])
    compute = fit_compute(two_n, macs_per_sample=MACS)
    assert compute.status == INSUFFICIENT
    assert "3 or more training precisions" in compute.reason and "n = 8, 16" in compute.reason
    with pytest.raises(ValueError, match="compute fit is not usable"):
        compute.energy_per_iter(8, 32)
    one_m = fit_uplink(synthetic("a", 10, 0, m_values=[8]))
    assert one_m.status == INSUFFICIENT and "two message sizes" in one_m.reason


def test_alpha_prior_lets_two_precisions_fit_and_stays_near_the_prior():
    records = synthetic("a", 20, 1, n_values=[15, 16], noise=0.01)
    fit = fit_compute(records, macs_per_sample=MACS, alpha_prior=1.25, alpha_prior_sd=0.3)
    assert fit.ok and fit.alpha_prior == (1.25, 0.3)
    assert abs(fit.alpha - 1.25) < 0.6
    assert fit.stderr["alpha"] <= 0.3 + 1e-9         # the posterior is never wider than the prior
    predicted = fit.energy_per_iter([15, 16], 32)
    measured = [np.median([r.train_j_per_iter for r in records if r.n == n and r.batch_size == 32]) for n in (15, 16)]
    assert np.allclose(predicted, measured, rtol=0.05)
    with pytest.raises(ValueError, match="alpha_prior must lie within"):
        fit_compute(records, macs_per_sample=MACS, alpha_prior=9.0)


def test_flat_energy_gives_a_zero_precision_term():
    flat = dict(TRUTH, joules_per_mac=0.0)
    fit = calibrate(synthetic("a", 60, 2, truth=flat, noise=0.01), macs_per_sample=MACS).fleet.compute
    assert fit.ok
    assert fit.joules_per_mac * 32 * MACS < 0.05 * fit.fixed_j
    assert fit.fixed_j == pytest.approx(TRUTH["fixed_j"], rel=0.02)


def test_per_n_table_holds_medians_where_data_allow():
    records = synthetic("a", 40, 6, n_values=[8, 16, 24, 32], noise=0.0)
    table = calibrate(records, macs_per_sample=MACS).fleet.compute.table_lookup()
    assert set(table) == {8, 16, 24, 32}
    for n, joules in table.items():
        values = sorted(r.train_j_per_iter for r in records if r.n == n)
        assert joules == pytest.approx(float(np.median(values)))


def test_calibration_round_trips_through_strict_json():
    cal = calibrate(synthetic("pi-1", 30, 0) + synthetic("pi-2", 2, 1), macs_per_sample=MACS, alpha_prior=1.25)
    text = json.dumps(cal.to_dict(), allow_nan=False)
    assert Calibration.from_dict(json.loads(text)) == cal
    with pytest.raises(ValueError, match="not a calibration dict"):
        Calibration.from_dict({"records": 3})


def test_for_device_falls_back_to_the_fleet():
    cal = calibrate(synthetic("pi-1", 40, 0) + synthetic("pi-2", 2, 1), macs_per_sample=MACS)
    assert cal.devices["pi-2"].compute.status == INSUFFICIENT
    assert cal.for_device("pi-2").compute == cal.fleet.compute
    assert cal.for_device("pi-1").compute == cal.devices["pi-1"].compute
    assert cal.for_device("pi-1", min_records=100).compute == cal.fleet.compute
    assert cal.for_device("unknown") == cal.fleet


def test_testbed_model_takes_the_calibrated_parameters():
    cal = calibrate(synthetic("pi-1", 60, 0), macs_per_sample=MACS)
    model = testbed_model.TestbedEnergy.from_calibration(counts(get_architecture("mlp")), cal, ["pi-1", "pi-9"])
    fit = cal.devices["pi-1"]
    assert float(model.train_energy(16)[0]) == pytest.approx(float(fit.compute.energy_per_iter(16, 32)))
    assert float(model.uplink_energy(8)[0]) == pytest.approx(float(fit.uplink.energy(8 * D, 1)))
    assert float(model.train_energy(16)[1]) == pytest.approx(float(cal.fleet.compute.energy_per_iter(16, 32)))


def test_calibrate_checks_its_inputs():
    with pytest.raises(ValueError, match="macs_per_sample must be a positive integer"):
        calibrate([], macs_per_sample=0)
    with pytest.raises(TypeError, match="EnergyRecord"):
        calibrate([{"device": "a"}], macs_per_sample=MACS)


# --- convergence constants from device statistics -----------------------------------------------------------

LAMBDA = np.geomspace(0.1, 2.0, 20)          # a quadratic with mu = 0.1 and L = 2
PRIOR = ConvergenceConstants(L=1.0, mu=0.05, G=1.0, Gamma=0.0, rho=10.0, sigma=(1.0,) * 4, sampling=(0.25,) * 4)


def quadratic_run(rounds: int = 40, lr: float = 0.3, variances=(0.5, 1.0, 1.5, 2.0), seed: int = 0):
    """Gradient descent on F(w) = w' diag(LAMBDA) w / 2 by 4 identical devices (I = 1), reporting their statistics."""
    w = np.random.default_rng(seed).normal(0.0, 1.0, LAMBDA.size)
    stats, models, grads = [], [], []
    for r in range(rounds):
        g = LAMBDA * w
        models.append(w.copy())
        grads.append(g)
        for k, var in enumerate(variances):
            stats.append(RoundStats(device=f"d{k}", round=r, loss=float(0.5 * np.sum(LAMBDA * w * w)),
                                    grad_sq_norm=float(g @ g + var), grad_variance=var, samples=100, local_iters=1,
                                    lr=lr))
        w = w - lr * g
    return stats, models, grads


def test_constants_from_statistics_of_a_known_quadratic():
    stats, models, grads = quadratic_run()
    est = estimate_constants(stats, prior=PRIOR, secants=(models, grads))
    c = est.constants
    assert 0.6 * 2.0 <= c.L <= 2.0 * (1 + 1e-9)                # secants never exceed the true L
    assert 0.1 <= c.mu <= 0.25                                # the PL ratio never falls below the true mu
    assert c.G ** 2 == pytest.approx(float(np.quantile([s.grad_sq_norm for s in stats], 0.95)))
    assert c.sigma == pytest.approx(tuple(np.sqrt([0.5, 1.0, 1.5, 2.0])))
    assert est.f_star == pytest.approx(0.0, abs=1e-3) and c.Gamma == pytest.approx(0.0, abs=1e-3)
    assert c.rho == PRIOR.rho and "prior" in est.sources["rho"]
    assert est.sources["L"].startswith("gradient secants")
    assert json.loads(json.dumps(est.to_dict()))["rounds_used"] == 40


def test_smoothness_from_the_loss_decrease_without_secants():
    stats, _, _ = quadratic_run(variances=(0.0, 0.0, 0.0, 0.0))
    est = estimate_constants(stats, prior=PRIOR)
    assert est.sources["L"].startswith("descent-lemma")
    assert 0.5 <= est.constants.L <= 2.0 * (1 + 1e-6)


def test_few_rounds_fall_back_to_the_prior():
    stats, _, _ = quadratic_run(rounds=2)
    est = estimate_constants(stats, prior=PRIOR)
    assert est.constants.mu == PRIOR.mu and "fewer than 3 rounds" in est.sources["mu"]
    assert estimate_constants([], prior=PRIOR, devices=["a", "b", "c", "d"]).constants.sigma == PRIOR.sigma
    with pytest.raises(ValueError, match="two or more models"):
        smoothness_from_secants([np.zeros(3)], [np.zeros(3)])


def test_loss_curve_fit_and_rounds_predicted_against_observed():
    f_star, scale, iters = 0.2, 30.0, 5
    stats = [RoundStats(device=d, round=r, loss=f_star + scale / (iters * r + 1.0), grad_sq_norm=1.0,
                        grad_variance=0.1, samples=50, local_iters=iters) for r in range(60) for d in ("a", "b")]
    curve = loss_curve(stats)
    assert fit_loss_curve(curve) == pytest.approx((f_star, scale), rel=1e-6)
    est = estimate_constants(stats, prior=PRIOR, devices=["a", "b"])
    target = 0.35
    cmp = compare_rounds(est, d=100, curve=curve, target=target, local_iters=iters, devices=2, m=16, n=16)
    expected = int(np.ceil((scale / (target - f_star) - 1.0) / iters))
    assert cmp.observed == expected
    assert cmp.predicted_curve == pytest.approx(expected, abs=1.0)
    assert cmp.epsilon == pytest.approx(target - f_star, rel=1e-6)
    assert cmp.predicted_bound is not None and cmp.predicted_bound > 0
    assert cmp.ratio == pytest.approx(cmp.predicted_bound / cmp.observed)
    by_accuracy = compare_rounds(est, d=100, curve=curve, target=0.9, local_iters=iters, devices=2, m=16, n=16,
                                 accuracy=[(r, 0.5 + r / 100) for r in range(60)])
    assert by_accuracy.kind == "accuracy" and by_accuracy.observed == 40
    assert by_accuracy.epsilon == pytest.approx(scale / (iters * 40 + 1.0), rel=1e-6)
    unreachable = compare_rounds(est, d=100, curve=curve, target=0.1, local_iters=iters, devices=2, m=16, n=16)
    assert unreachable.observed is None and unreachable.predicted_bound is None


def test_a_cost_per_phase_is_told_apart_from_the_iterations_when_two_i_ran():
    """Phases of 5 and 20 iterations that each cost 3 iterations' worth on top: phase_j recovers it."""
    rng = np.random.default_rng(7)
    per_iter = {n: TRUTH["fixed_j"] + 32 * MACS * TRUTH["joules_per_mac"] * (n / 32) ** TRUTH["alpha"]
                for n in (8, 16, 32)}
    phase = 3 * per_iter[8]
    records = [EnergyRecord(device="a", round=r, n=n, m=8, local_iters=i, batch_size=32,
                            train_j=(phase + i * per_iter[n]) * (1 + 0.02 * rng.standard_normal()),
                            uplink_j=0.01, uplink_bits=8 * D)
               for r, (n, i) in enumerate([(n, i) for n in (8, 16, 32) for i in (5, 20)] * 8)]
    fit = fit_compute(records, macs_per_sample=MACS)
    assert fit.ok
    assert fit.phase_j == pytest.approx(phase, rel=0.15)
    assert fit.energy_per_iter(16, 32) == pytest.approx(per_iter[16], rel=0.05)
    # Without the second I the part per phase cannot be seen, and the iterations carry it.
    assert fit_compute([r for r in records if r.local_iters == 20], macs_per_sample=MACS).phase_j == 0.0
    params = PI4_DEFAULTS.with_calibration(calibrate(records, macs_per_sample=MACS).fleet)
    assert params.phase_j == fit.phase_j
    assert phase_energy(params, "train", Work(n=16, m=8, iterations=5, batch_size=32, model="mlp")) == \
        pytest.approx(phase + 5 * per_iter[16], rel=0.05)
