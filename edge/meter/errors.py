"""Exceptions of the meter package.

Each one also inherits the builtin a caller would naturally catch, so
``except TimeoutError`` or ``except ValueError`` keeps working::

    try:
        meter = PowerMeter("/dev/ttyACM0", timeout=2.0)
    except MeterTimeout:        # also a TimeoutError
        ...
"""

from __future__ import annotations


class MeterError(Exception):
    """Base class of every error raised by ``edge.meter``."""


class MeterTimeout(MeterError, TimeoutError):
    """The meter did not answer (identify itself, acknowledge a command) in time."""


class MeterClosed(MeterError, RuntimeError):
    """The meter was used after ``close()``."""


class UnknownPhase(MeterError, KeyError):
    """No completed phase of that name exists."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ProtocolError(MeterError, ValueError):
    """A line that does not follow docs/meter-protocol.md.

    ``reason`` is one short machine-readable word: ``crc`` (checksum mismatch),
    ``frame`` (no ``*HH`` trailer), ``format`` (fields missing or malformed),
    ``unknown`` (an unknown line type), ``encoding`` (not ASCII).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ConversionError(MeterError, ValueError):
    """An INA219 register value or setting outside what the chip can hold."""
