"""The uplink channel average of the paper: joules per transmitted bit, P / R_k, averaged over random draws.

Each draw places every device uniformly in a square (X, Y ~ U[1, 500] m,
distance sqrt(X^2 + Y^2)), draws one Rayleigh power gain g ~ Exp(1) shared by
all devices, and evaluates R_k = Bw log2(1 + P g dist_k^-4 / (Bw N0)). The
authors average P d / R_k over 10^4 draws; since d is a constant we average
P / R_k, and ``kim2022.uplink_energy`` multiplies by m d.

    >>> from basestation.energy.channel import ChannelConstants, average_joules_per_bit
    >>> jpb = average_joules_per_bit(ChannelConstants(), devices=50, seed=0)
    >>> jpb.shape
    (50,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelConstants:
    """Transmit power ``P`` (W), bandwidth ``Bw`` (Hz), noise density ``N0`` (W/Hz), the side of the
    placement square in metres (``area_min`` to ``area_max``) and the path-loss exponent."""

    P: float = 0.1
    Bw: float = 10e6
    N0: float = 4e-21
    area_min: float = 1.0
    area_max: float = 500.0
    path_loss_exponent: float = 4.0

    def __post_init__(self) -> None:
        for name in ("P", "Bw", "N0", "area_min", "path_loss_exponent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"channel constant {name} must be a positive number, got {value!r}")
        if not self.area_max > self.area_min:
            raise ValueError(f"area_max must exceed area_min, got {self.area_min!r}..{self.area_max!r}")


def rate(gain: np.ndarray, ch: ChannelConstants) -> np.ndarray:
    """Shannon rate R = Bw log2(1 + P h / (Bw N0)) in bit/s for channel power gains ``gain``."""
    return ch.Bw * np.log2(1.0 + ch.P * gain / (ch.Bw * ch.N0))


def average_joules_per_bit(ch: ChannelConstants, devices: int, *, draws: int = 10_000, seed: int = 0) -> np.ndarray:
    """Mean of P / R_k over ``draws`` seeded channel draws, one value per device (shape ``(devices,)``)."""
    if not (isinstance(devices, int) and devices >= 1):
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(ch.area_min, ch.area_max, size=(draws, devices))
    y = rng.uniform(ch.area_min, ch.area_max, size=(draws, devices))
    g = rng.exponential(1.0, size=(draws, 1))       # one fading draw shared by all devices
    gain = g * np.hypot(x, y) ** (-ch.path_loss_exponent)
    with np.errstate(divide="ignore"):
        return np.mean(ch.P / rate(gain, ch), axis=0)
