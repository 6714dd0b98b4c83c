"""The testbed's own energy model: the paper's structure with measured costs instead of ASIC constants.

d and N_c come from the model architecture (``models.counts``); the joules of
one local iteration and of one uplink come from per-device parameters that
calibration fits to measured energy (``basestation.energy.calibration``):

    E_train,k(n) = fixed_j + B * N_c * joules_per_mac * (n / 32)^alpha          (one local iteration)
    E_phase,k    = phase_j                                                      (once per round's training)
    E_comm,k(m)  = joules_per_message * messages + joules_per_bit * (m * d + overhead_bits)

Until there are measurements, ``PI4_DEFAULTS`` gives measured-like values for
a Raspberry Pi 4 on Wi-Fi (their derivation is in docs/energy-model.md).

    >>> from basestation.energy.testbed_model import TestbedEnergy, PI4_DEFAULTS
    >>> from models import counts, get_architecture
    >>> model = TestbedEnergy(counts(get_architecture("mlp")), {"pi-1": PI4_DEFAULTS, "pi-2": PI4_DEFAULTS})
    >>> model.train_energy([8, 32]).shape
    (2, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike

from basestation.energy.calibration import Calibration, DeviceCalibration
from models import Counts


@dataclass(frozen=True)
class DeviceEnergyParams:
    """Energy parameters of one device (see the module docstring for the formulas).

    ``train_table`` optionally maps a training precision to measured joules per
    local iteration; ``TestbedEnergy(use_table=True)`` uses it where present.
    """

    fixed_j: float
    joules_per_mac: float
    alpha: float
    joules_per_bit: float
    joules_per_message: float
    train_table: Mapping[int, float] = field(default_factory=dict)
    phase_j: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_j", "joules_per_mac", "alpha", "joules_per_bit", "joules_per_message", "phase_j"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")

    def with_calibration(self, cal: DeviceCalibration, *, table: bool = True) -> "DeviceEnergyParams":
        """These parameters with every part that ``cal`` fitted successfully replaced by the fit."""
        out = self
        if cal.compute.ok:
            out = replace(out, fixed_j=cal.compute.fixed_j, joules_per_mac=cal.compute.joules_per_mac,
                          alpha=cal.compute.alpha, phase_j=cal.compute.phase_j,
                          train_table=cal.compute.table_lookup() if table else {})
        elif table and cal.compute.table:
            out = replace(out, train_table=cal.compute.table_lookup())
        if cal.uplink.ok:
            out = replace(out, joules_per_bit=cal.uplink.joules_per_bit,
                          joules_per_message=cal.uplink.joules_per_message)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (table keys as strings, for JSON)."""
        return {"fixed_j": self.fixed_j, "joules_per_mac": self.joules_per_mac, "alpha": self.alpha,
                "joules_per_bit": self.joules_per_bit, "joules_per_message": self.joules_per_message,
                "phase_j": self.phase_j, "train_table": {str(k): v for k, v in sorted(self.train_table.items())}}


# Raspberry Pi 4 running the numpy engine, MQTT over Wi-Fi, as the emulated meter's pi4 profile sees it;
# docs/energy-model.md gives the derivation.
PI4_DEFAULTS = DeviceEnergyParams(fixed_j=9e-5, joules_per_mac=2e-10, alpha=1.25, joules_per_bit=1.25e-7,
                                  joules_per_message=2e-3)


class TestbedEnergy:
    """An ``EnergyModel`` for the testbed: one ``DeviceEnergyParams`` per device.

    ``batch_size`` is the minibatch of one local iteration, ``messages`` the
    messages per uplink, ``overhead_bits`` the header bits added to m * d.
    """

    def __init__(self, model_counts: Counts, devices: Mapping[str, DeviceEnergyParams], *, batch_size: int = 32,
                 messages: int = 1, overhead_bits: int = 0, use_table: bool = False) -> None:
        if not devices:
            raise ValueError("TestbedEnergy needs the parameters of at least one device")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(messages, int) and messages >= 0):
            raise ValueError(f"messages must be a non-negative integer, got {messages!r}")
        if not (isinstance(overhead_bits, int) and overhead_bits >= 0):
            raise ValueError(f"overhead_bits must be a non-negative integer, got {overhead_bits!r}")
        self.counts = model_counts
        self.params = dict(devices)
        self.batch_size = batch_size
        self.messages = messages
        self.overhead_bits = overhead_bits
        self.use_table = use_table
        self._names = tuple(self.params)

    def __repr__(self) -> str:
        return (f"TestbedEnergy(d={self.d}, N_c={self.counts.macs}, devices={len(self._names)}, "
                f"batch_size={self.batch_size})")

    @classmethod
    def from_calibration(cls, model_counts: Counts, calibration: Calibration, device_names: list[str] | None = None,
                         *, prior: DeviceEnergyParams = PI4_DEFAULTS, min_records: int = 0,
                         **kwargs: Any) -> "TestbedEnergy":
        """Parameters from ``calibration`` (own fit, else the fleet's, else ``prior``) for each device.

        ``device_names`` defaults to the devices the calibration saw; a device's
        own fits are used once it has ``min_records`` records.
        """
        names = list(device_names) if device_names is not None else sorted(calibration.devices)
        if not names:
            raise ValueError("no devices: pass device_names or a calibration with per-device fits")
        use_table = bool(kwargs.get("use_table", False))
        params = {name: prior.with_calibration(calibration.for_device(name, min_records=min_records), table=use_table)
                  for name in names}
        return cls(model_counts, params, **kwargs)

    @property
    def d(self) -> int:
        """Number of model parameters."""
        return self.counts.params

    @property
    def devices(self) -> tuple[str, ...]:
        """Device names."""
        return self._names

    def train_energy(self, n: ArrayLike) -> np.ndarray:
        """Joules of one local iteration at precision ``n`` for every device, shape ``(N,) + shape(n)``."""
        n = np.asarray(n, dtype=float)
        rows = []
        work = self.batch_size * self.counts.macs
        for name in self._names:
            p = self.params[name]
            e = p.fixed_j + work * p.joules_per_mac * (n / 32.0) ** p.alpha
            if self.use_table and p.train_table:
                for bits, joules in p.train_table.items():
                    e = np.where(n == bits, joules, e)
            rows.append(e)
        return np.stack(rows)

    def phase_energy(self) -> np.ndarray:
        """Joules of a training phase beyond its iterations (``phase_j``) for every device, shape ``(N,)``."""
        return np.array([self.params[name].phase_j for name in self._names], dtype=float)

    def uplink_energy(self, m: ArrayLike) -> np.ndarray:
        """Joules of one uplink at ``m`` bits per value for every device, shape ``(N,) + shape(m)``."""
        bits = np.asarray(m, dtype=float) * self.d + self.overhead_bits
        return np.stack([p.joules_per_message * self.messages + p.joules_per_bit * bits
                         for p in (self.params[name] for name in self._names)])
