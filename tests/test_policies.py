"""Precision policies: fixed, model and the measured closed loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from basestation.energy import testbed_model
from basestation.energy.policies import (Decision, FixedPolicy, LoopTuning, MeasuredPolicy, ModelPolicy,
                                         build_policy)
from basestation.energy.presets import kim2022
from basestation.energy.problem import Problem
from basestation.energy.records import EnergyRecord
from basestation.energy.solver import joint_search
from models import counts, get_architecture

COUNTS = counts(get_architecture("mlp"))
NAMES = [f"pi-{k}" for k in range(5)]
# Measured energy of a fleet whose best (n, m) at I = 1, K = 5, epsilon = 0.1 is well separated (every
# neighbouring precision costs at least 2.8% more); the prior (Pi 4 defaults) points elsewhere.
TRUTH = testbed_model.DeviceEnergyParams(fixed_j=1e-4, joules_per_mac=2.2e-7, alpha=2.0, joules_per_bit=2.2e-7,
                                         joules_per_message=1e-3)


def measured_fleet(params=TRUTH, names=NAMES) -> testbed_model.TestbedEnergy:
    return testbed_model.TestbedEnergy(COUNTS, {name: params for name in names})


def known_best(policy: MeasuredPolicy, fleet: testbed_model.TestbedEnergy) -> tuple[int, int]:
    problem = Problem(fleet, policy.convergence, policy.epsilon)
    best = joint_search(problem, local_iters=[policy.local_iters], devices=[policy.devices_per_round])
    return best.n, best.m


def run_loop(policy: MeasuredPolicy, fleet: testbed_model.TestbedEnergy, rounds: int, *, noise: float,
             seed: int, records: list[EnergyRecord] | None = None, start: int = 0) -> list[Decision]:
    """Feed the policy the energy the fleet 'measures' at each decided precision (multiplicative noise)."""
    rng = np.random.default_rng(seed)
    records = [] if records is None else records
    decisions = []
    for r in range(start, start + rounds):
        d = policy.decide(r, records, [])
        decisions.append(d)
        for k, name in enumerate(fleet.devices):
            m = d.m_for(name)
            train = d.local_iters * float(fleet.train_energy(d.n)[k]) * (1 + noise * rng.standard_normal())
            uplink = float(fleet.uplink_energy(m)[k]) * (1 + noise * rng.standard_normal())
            records.append(EnergyRecord(device=name, round=r, n=d.n, m=m, local_iters=d.local_iters, batch_size=32,
                                        train_j=train, uplink_j=uplink, uplink_bits=m * COUNTS.params))
    return decisions


def new_policy(**kwargs) -> MeasuredPolicy:
    options = dict(model="mlp", devices=NAMES, epsilon=0.1, local_iters=1, devices_per_round=5, seed=0)
    options.update(kwargs)
    return MeasuredPolicy(**options)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_loop_settles_on_the_best_precision_and_stays(seed):
    policy = new_policy(seed=seed)
    fleet = measured_fleet()
    best = known_best(policy, fleet)
    decisions = run_loop(policy, fleet, 25, noise=0.03, seed=seed)
    chosen = [(d.n, d.m) for d in decisions]
    assert chosen[0] != best                               # it had to learn
    assert all(c == best for c in chosen[4:]), chosen      # settled within 5 rounds, no flapping after
    assert not any(d.explore for d in decisions[4:])
    assert any(d.explore for d in decisions[:4])


def test_closed_loop_on_a_flat_optimum_does_not_flap():
    flat = testbed_model.DeviceEnergyParams(fixed_j=3e-4, joules_per_mac=2e-8, alpha=1.5, joules_per_bit=5e-8,
                                            joules_per_message=2e-3)
    policy = new_policy(local_iters=5)
    decisions = run_loop(policy, measured_fleet(flat), 30, noise=0.05, seed=7)
    settled = [(d.n, d.m) for d in decisions[8:]]
    assert len(set(settled)) == 1, settled


def test_decisions_are_json_and_carry_their_inputs():
    policy = new_policy()
    decisions = run_loop(policy, measured_fleet(), 6, noise=0.03, seed=0)
    first, last = decisions[0], decisions[-1]
    assert first.explore and "explore" in first.reason and first.inputs["records"] == 0
    assert first.inputs["fit_missing"]
    assert last.inputs["records"] == 25 and last.inputs["calibration"]["compute"]["status"] == "ok"
    for d in decisions:
        text = json.dumps({"inputs": d.inputs, "detail": d.detail()}, allow_nan=False)
        assert json.loads(text)["detail"]["reason"] == d.reason
        assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert policy.last_calibration is not None and policy.last_calibration.records == 25


def test_resumed_policy_continues_like_the_uninterrupted_one():
    fleet = measured_fleet()
    straight = new_policy()
    records: list[EnergyRecord] = []
    first = run_loop(straight, fleet, 3, noise=0.03, seed=0, records=records)
    saved = [r for r in records]
    rest = run_loop(straight, fleet, 4, noise=0.03, seed=1, records=records, start=3)

    restarted = new_policy()
    restarted.resume(Decision.from_dict(json.loads(json.dumps(first[-1].to_dict()))))
    again = run_loop(restarted, fleet, 4, noise=0.03, seed=1, records=saved, start=3)
    assert [(d.n, d.m, d.reason) for d in again] == [(d.n, d.m, d.reason) for d in rest]


def test_measured_policy_can_give_each_device_its_own_m():
    cheap = TRUTH
    costly = testbed_model.DeviceEnergyParams(**{**TRUTH.to_dict(), "joules_per_bit": 2e-6, "train_table": {}})
    fleet = testbed_model.TestbedEnergy(COUNTS, {**{n: cheap for n in NAMES[:3]}, **{n: costly for n in NAMES[3:]}})
    policy = new_policy(per_device_m=True, min_device_records=5)
    decisions = run_loop(policy, fleet, 12, noise=0.02, seed=3)
    last = decisions[-1]
    assert last.m_per_device is not None
    assert min(last.m_for(n) for n in NAMES[:3]) > max(last.m_for(n) for n in NAMES[3:])
    assert last.m_per_device == decisions[-2].m_per_device


def test_fixed_policy():
    policy = FixedPolicy(n=12, m=6, local_iters=3, devices_per_round=2, m_per_device={"pi-1": 4})
    d = policy.decide(7, [])
    assert (d.n, d.m, d.local_iters, d.devices_per_round, d.m_for("pi-1"), d.m_for("pi-2")) == (12, 6, 3, 2, 4, 6)
    assert d.reason == "fixed by the experiment" and d.inputs["round"] == 7
    with pytest.raises(ValueError, match="n must be an integer number of bits in 1..32, got 0"):
        FixedPolicy(n=0, m=8)
    with pytest.raises(ValueError, match="round must be a non-negative integer"):
        policy.decide(-1, [])


def test_model_policy_reproduces_the_paper():
    problem = kim2022().problem(0.1)
    tied = ModelPolicy(problem, local_iters=1, devices_per_round=5, mode="tied").decide(0, [])
    assert (tied.n, tied.m) == (17, 17)
    joint = ModelPolicy(problem, mode="joint").decide(3, [])
    assert (joint.local_iters, joint.devices_per_round, joint.m, joint.n) == (1, 1, 11, 18)
    assert joint.predicted["energy_j"] > 0 and joint.inputs["n_min"] == 15
    with pytest.raises(ValueError, match="mode must be"):
        ModelPolicy(problem, mode="other")


def test_build_policy_from_configuration():
    assert isinstance(build_policy("fixed", devices=NAMES, local_iters=1, devices_per_round=5, n=8, m=8), FixedPolicy)
    model = build_policy("model", devices=NAMES, local_iters=5, devices_per_round=5)
    d = model.decide(0, [])
    assert 1 <= d.m <= 32 and model.problem.devices == 5
    measured = build_policy("measured-fit", devices=NAMES, local_iters=1, devices_per_round=5,
                            samples=50, prior={"fixed_j": 1e-4, "joules_per_mac": 1e-9, "alpha": 1.0,
                                                       "joules_per_bit": 1e-7, "joules_per_message": 1e-3},
                            convergence={"L": 2.0, "mu": 0.01, "G": 1.0, "Gamma": 0.0, "rho": 100.0, "sigma": 0.5})
    assert isinstance(measured, MeasuredPolicy) and measured.tuning.samples == 50
    assert measured.prior.alpha == 1.0 and measured.convergence.sigma == (0.5,) * 5
    assert measured.decide(0, []).explore
    with pytest.raises(ValueError, match="needs n and m"):
        build_policy("fixed", devices=NAMES, local_iters=1, devices_per_round=5)
    with pytest.raises(ValueError, match="unknown precision policy 'greedy'"):
        build_policy("greedy", devices=NAMES, local_iters=1, devices_per_round=5)


def test_measured_policy_checks_its_configuration():
    with pytest.raises(ValueError, match="devices_per_round must be an integer in 1..5"):
        new_policy(devices_per_round=6)
    with pytest.raises(ValueError, match="distinct names"):
        new_policy(devices=["a", "a"])
    with pytest.raises(ValueError, match="hysteresis must be a fraction"):
        new_policy(hysteresis=2.0)
    with pytest.raises(ValueError, match="min_device_records must be a non-negative integer"):
        LoopTuning(min_device_records=-1)
