"""Ready-made problems: the paper's ``kim2022`` preset and the testbed's own ``testbed`` preset.

``kim2022`` uses the constants the authors released (docs/energy-model.md):
the ASIC energy model, the 50 devices' sigma values (shipped as package data,
``kim2022_sigma.txt``) and the seeded channel average. ``testbed`` uses the
architecture's d and N_c, measured-like Raspberry Pi 4 energy parameters (or a
calibration) and convergence constants measured on the 8x8 digits MLP.

    >>> from basestation.energy.presets import kim2022
    >>> preset = kim2022()
    >>> [preset.n_min(eps) for eps in (0.1, 0.01, 0.001)]
    [15, 17, 19]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

from basestation.energy.calibration import Calibration
from basestation.energy.channel import ChannelConstants, average_joules_per_bit
from basestation.energy.kim2022 import (KIM2022_CONVERGENCE_SCALARS, KIM2022_HARDWARE, ConvergenceConstants,
                                        HardwareConstants, Kim2022Energy)
from basestation.energy.problem import EnergyModel, Problem
from basestation.energy.testbed_model import PI4_DEFAULTS, DeviceEnergyParams, TestbedEnergy


@dataclass(frozen=True)
class Preset:
    """An energy model and convergence constants that describe the same devices."""

    name: str
    energy: EnergyModel
    convergence: ConvergenceConstants
    description: str

    def problem(self, epsilon: float) -> Problem:
        """The precision problem at target optimality gap ``epsilon``."""
        return Problem(self.energy, self.convergence, epsilon, name=self.name)

    def n_min(self, epsilon: float) -> int:
        """Smallest training precision with a finite number of rounds at ``epsilon``."""
        return self.problem(epsilon).n_min()


def kim2022_sigma() -> tuple[float, ...]:
    """The released sigma_k of the paper's 50 devices (one value a line, trailing commas)."""
    text = resources.files("basestation.energy").joinpath("kim2022_sigma.txt").read_text(encoding="utf-8")
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.strip().rstrip(",").strip()
        if item:
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(f"kim2022_sigma.txt line {number}: not a number: {line!r}") from None
    return tuple(values)


@lru_cache(maxsize=8)
def _channel_average(channel: ChannelConstants, devices: int, draws: int, seed: int) -> tuple[float, ...]:
    return tuple(float(v) for v in average_joules_per_bit(channel, devices, draws=draws, seed=seed))


def kim2022(*, seed: int = 0, draws: int = 10_000, hardware: HardwareConstants = KIM2022_HARDWARE,
            channel: ChannelConstants = ChannelConstants()) -> Preset:
    """The paper's model with its released constants; the channel average uses ``draws`` draws from ``seed``."""
    sigma = kim2022_sigma()
    jpb = _channel_average(channel, len(sigma), draws, seed)
    convergence = ConvergenceConstants(sigma=sigma, **KIM2022_CONVERGENCE_SCALARS)
    return Preset("kim2022", Kim2022Energy(hardware, jpb), convergence,
                  f"Kim et al. 2022 released constants, channel averaged over {draws} draws (seed {seed})")


# Estimated (convergence.estimate_constants) from a 60-round FedAvg run of the edge trainer: the 64-32-10 MLP on
# 8x8 digits, 10 IID devices, I = 5, B = 32, lr 0.1, float32; rho is the paper's. See docs/energy-model.md.
TESTBED_CONVERGENCE = {"L": 2.2, "mu": 0.011, "G": 0.91, "Gamma": 0.0, "rho": 100.0, "sigma": 0.66}


def testbed(model: str = "mlp", *, devices: int = 10, batch_size: int = 32,
            params: DeviceEnergyParams = PI4_DEFAULTS, calibration: Calibration | None = None,
            convergence: ConvergenceConstants | None = None) -> Preset:
    """The testbed's model for architecture ``model`` with ``devices`` devices sampled uniformly.

    Energy parameters come from ``calibration`` where it has usable fits (per
    device where the device names match ``pi-0``..., else the fleet fit) and
    from ``params`` otherwise.
    """
    from models import counts, get_architecture

    if not (isinstance(devices, int) and devices >= 1):
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    model_counts = counts(get_architecture(model))
    if calibration is not None:
        names = sorted(calibration.devices) if len(calibration.devices) == devices else \
            [f"pi-{k}" for k in range(devices)]
        energy = TestbedEnergy.from_calibration(model_counts, calibration, names, prior=params,
                                                batch_size=batch_size)
        source = "calibrated energy parameters"
    else:
        energy = TestbedEnergy(model_counts, {f"pi-{k}": params for k in range(devices)}, batch_size=batch_size)
        source = "Raspberry Pi 4 default energy parameters"
    if convergence is None:
        scalars = {k: v for k, v in TESTBED_CONVERGENCE.items() if k != "sigma"}
        convergence = ConvergenceConstants(sigma=tuple([TESTBED_CONVERGENCE["sigma"]] * devices),
                                           sampling=tuple([1.0 / devices] * devices), **scalars)
    return Preset("testbed", energy, convergence,
                  f"testbed model '{model}' (d={model_counts.params}, N_c={model_counts.macs}), {source}")


PRESETS: dict[str, Callable[..., Preset]] = {"kim2022": kim2022, "testbed": testbed}


def get_preset(name: str, **options: Any) -> Preset:
    """The preset registered as ``name`` (``kim2022`` or ``testbed``), built with ``options``."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    return factory(**options)
