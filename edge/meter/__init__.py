"""Power metering: an INA219 read by a microcontroller, streamed over a serial link.

    >>> from edge.meter import PowerMeter
    >>> meter = PowerMeter("/dev/ttyACM0")          # doctest: +SKIP
    >>> with meter.phase("train"):                  # doctest: +SKIP
    ...     train()
    >>> meter.phase_energy("train").joules          # doctest: +SKIP

Modules: ``ina219`` (register conversions), ``protocol`` (line format and
CRC-8), ``clock`` (meter-to-host clock fit), ``integrate`` (energy over
phases), ``stream`` (all of those over a byte stream; pure), ``reader``
(PowerMeter: pyserial and a thread), ``cli`` (``qfl meter``). Importing
this package or its pure modules does not import pyserial; only touching
``PowerMeter`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.meter.errors import ConversionError, MeterClosed, MeterError, MeterTimeout, ProtocolError, UnknownPhase
from edge.meter.integrate import PhaseEnergy

if TYPE_CHECKING:
    from edge.meter.reader import Phase, PowerMeter

__all__ = [
    "ConversionError",
    "MeterClosed",
    "MeterError",
    "MeterTimeout",
    "Phase",
    "PhaseEnergy",
    "PowerMeter",
    "ProtocolError",
    "UnknownPhase",
]


def __getattr__(name: str) -> object:
    # PowerMeter needs pyserial; load it only when asked for.
    if name in ("PowerMeter", "Phase"):
        from edge.meter import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'edge.meter' has no attribute {name!r}")
