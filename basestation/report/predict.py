"""What the energy model predicted for each measured phase, before and after calibration (pure).

The report compares every stored energy phase with the testbed energy model
(``basestation.energy.testbed_model``) evaluated at the work that phase did:

- ``train``: ``iterations * E_iter(n)`` with the round's plan (n, local
  iterations, minibatch) and the architecture's MAC count;
- ``uplink``: ``joules_per_message + joules_per_bit * bits`` with the bits the
  device really sent (the stored update's size, headers included), or
  ``m * d`` when the update was not stored.

*Before calibration* uses the model's prior parameters (Raspberry Pi 4
defaults); *after calibration* uses the calibration the basestation had fitted
before that round (a fit stored after round r - 1 or earlier), per device
once the device has ``MIN_DEVICE_RECORDS`` records and the fleet's fit before,
so the calibrated figure is a prediction, not a fit to the same measurement. Phases
other than ``train`` and ``uplink`` have no modelled energy.

    >>> plans = {3: PlanFacts(n=8, m=8, iterations=5, batch_size=32, model="mlp")}
    >>> model_j, calibrated_j = predict_phase("pi-0", 3, "train", plans, fits=[], uplink_bits=None)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

from basestation.energy.calibration import Calibration
from basestation.energy.policies import MeasuredPolicy
from basestation.energy.testbed_model import PI4_DEFAULTS, DeviceEnergyParams, TestbedEnergy
from models import Counts, counts, get_architecture

MODELLED_PHASES = ("train", "uplink")

#: A device's own fit is used once it has this many records (the fleet's before), as the
#: measured policy does, so the report predicts with the parameters the policy used.
MIN_DEVICE_RECORDS: int = inspect.signature(MeasuredPolicy).parameters["min_device_records"].default


@dataclass(frozen=True)
class PlanFacts:
    """The parts of a round plan the energy model needs."""

    n: int
    m: int
    iterations: int
    batch_size: int
    model: str


@lru_cache(maxsize=16)
def _counts(model: str) -> Counts:
    return counts(get_architecture(model))


def fit_before(round_: int, fits: list[tuple[int, Calibration]]) -> Calibration | None:
    """The latest calibration fitted after a round earlier than ``round_`` (fits in storage order)."""
    usable = [fit for fitted_after, fit in fits if fitted_after < round_]
    return usable[-1] if usable else None


def phase_energy(params: DeviceEnergyParams, phase: str, plan: PlanFacts, uplink_bits: int | None) -> float | None:
    """Modelled joules of ``phase`` with device parameters ``params``; None for a phase the model lacks."""
    if phase not in MODELLED_PHASES:
        return None
    size = _counts(plan.model)
    if phase == "train":
        model = TestbedEnergy(size, {"device": params}, batch_size=plan.batch_size)
        return float(model.train_energy(plan.n)[0]) * plan.iterations
    # What a message carries beyond the m * d payload bits (header, names, signature) is the model's overhead.
    overhead = 0 if uplink_bits is None else max(uplink_bits - plan.m * size.params, 0)
    model = TestbedEnergy(size, {"device": params}, overhead_bits=overhead)
    return float(model.uplink_energy(plan.m)[0])


def predict_phase(device: str, round_: int, phase: str, plans: dict[int, PlanFacts],
                  fits: list[tuple[int, Calibration]], uplink_bits: int | None,
                  prior: DeviceEnergyParams = PI4_DEFAULTS,
                  min_records: int = MIN_DEVICE_RECORDS) -> tuple[float | None, float | None]:
    """``(model_joules, calibrated_joules)`` of one measured phase; None where there is nothing to predict.

    None for both when the round has no plan or the phase is not modelled;
    ``calibrated_joules`` is None while no calibration preceded the round.
    """
    plan = plans.get(round_)
    if plan is None or phase not in MODELLED_PHASES:
        return None, None
    before = phase_energy(prior, phase, plan, uplink_bits)
    fit = fit_before(round_, fits)
    if fit is None:
        return before, None
    calibrated = prior.with_calibration(fit.for_device(device, min_records=min_records), table=False)
    return before, phase_energy(calibrated, phase, plan, uplink_bits)
