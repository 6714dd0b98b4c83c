"""What the energy model predicted for each measured phase, before and after calibration (pure).

The report compares every stored energy phase with the testbed energy model
(``basestation.energy.testbed_model``) evaluated at the work the device did in
that round (:class:`Work`, from its energy report and the round plan):

- ``train``: ``iterations * E_iter(n)`` with the minibatch size and the
  architecture's MAC count;
- ``uplink``: ``joules_per_message + joules_per_bit * bits`` with the bits the
  device sent (its update's size, headers included), or ``m * d`` when unknown.

*Before calibration* uses the model's prior parameters (Raspberry Pi 4
defaults). *After calibration* uses the last calibration the basestation had
stored when the round opened (:func:`fit_at`), per device once the device has
``MIN_DEVICE_RECORDS`` records and the fleet's fit before, as the measured
policy does; it is a prediction, never a fit to the same measurement. Phases
other than ``train`` and ``uplink`` have no modelled energy.

    >>> work = Work(n=8, m=8, iterations=5, batch_size=32, model="mlp", uplink_bits=20_080)
    >>> model_j, calibrated_j = predict_phase("pi-0", "train", work, fit=None)
"""

from __future__ import annotations

import inspect
from bisect import bisect_right
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
class Work:
    """What one device did in one round: precisions, local iterations, minibatch, architecture, bits sent."""

    n: int
    m: int
    iterations: int
    batch_size: int
    model: str
    uplink_bits: int | None = None


@lru_cache(maxsize=16)
def _counts(model: str) -> Counts:
    return counts(get_architecture(model))


def fit_at(opened_at: float, fits: list[tuple[float, Calibration]]) -> Calibration | None:
    """The calibration in force when a round opened: the last one stored at or before ``opened_at``.

    ``fits`` are ``(fitted_at, calibration)`` in storage order. Time, not the
    round number stored beside a fit, decides, so the rule holds however the
    basestation numbers its fits.
    """
    times = [t for t, _ in fits]
    index = bisect_right(times, opened_at)
    return fits[index - 1][1] if index else None


def phase_energy(params: DeviceEnergyParams, phase: str, work: Work, *, use_table: bool = False) -> float | None:
    """Modelled joules of ``phase`` with device parameters ``params``; None for a phase the model lacks.

    ``use_table``: training at a precision in ``params.train_table`` costs the table's measured joules.
    """
    if phase not in MODELLED_PHASES:
        return None
    size = _counts(work.model)
    if phase == "train":
        model = TestbedEnergy(size, {"device": params}, batch_size=work.batch_size, use_table=use_table)
        return float(model.train_energy(work.n)[0]) * work.iterations + params.phase_j
    # What a message carries beyond the m * d payload bits (header, names, signature) is the model's overhead.
    overhead = 0 if work.uplink_bits is None else max(work.uplink_bits - work.m * size.params, 0)
    model = TestbedEnergy(size, {"device": params}, overhead_bits=overhead)
    return float(model.uplink_energy(work.m)[0])


def predict_phase(device: str, phase: str, work: Work, fit: Calibration | None,
                  prior: DeviceEnergyParams = PI4_DEFAULTS,
                  min_records: int = MIN_DEVICE_RECORDS) -> tuple[float | None, float | None]:
    """``(model_joules, calibrated_joules)`` of one measured phase; None where there is nothing to predict.

    ``calibrated_joules`` is None without a calibration (``fit``) or when its
    fit of this phase's part (computation for ``train``, uplink for
    ``uplink``) is not usable yet. Raises ValueError for an architecture the
    model does not know.
    """
    if phase not in MODELLED_PHASES:
        return None, None
    before = phase_energy(prior, phase, work)
    if fit is None:
        return before, None
    fitted = fit.for_device(device, min_records=min_records)
    if not (fitted.compute if phase == "train" else fitted.uplink).ok:
        return before, None        # the data could not fit this part yet: nothing calibrated to show
    return before, phase_energy(prior.with_calibration(fitted, table=False), phase, work)
