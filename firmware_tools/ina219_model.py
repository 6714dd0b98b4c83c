"""An emulated INA219 and an emulated I2C bus, for running the meter firmware without hardware.

``EmulatedINA219`` models the register file of the chip (TI SBOS448G,
section 8.6): configuration (with reset), calibration (bit 0 reads 0), shunt
and bus voltage registers, and the current and power registers computed as
the chip does (``edge.meter.ina219`` holds that arithmetic). The analog side
is whatever ``set_inputs(shunt_volts, bus_volts)`` says; each call stands for
one completed conversion, which sets CNVR (reading the power register clears
it). ``EmulatedI2C`` answers ``readfrom_mem``/``writeto_mem``/``scan`` like
``machine.I2C`` and raises ``OSError(ENODEV)`` for an address nobody answers::

    chip = EmulatedINA219()
    bus = EmulatedI2C({0x40: chip})
    chip.set_inputs(shunt_volts=0.05, bus_volts=5.0)

Model choices the datasheet leaves open: a shunt input beyond the PGA range
saturates the register at full scale (+-4000 counts per gain step) and sets
OVF, like an overflowing current or power calculation does; the bus input is
clamped to 0..range; lower ADC resolutions round to multiples of
2^(12-bits) register counts; averaging and conversion timing are not modelled
(each ``set_inputs`` is one instantaneous conversion).
"""

from __future__ import annotations

import errno

from edge.meter import ina219

_READ_ONLY = (ina219.REG_SHUNT_VOLTAGE, ina219.REG_BUS_VOLTAGE, ina219.REG_POWER, ina219.REG_CURRENT)


class EmulatedINA219:
    """Register-level model of one INA219 (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Power-on state: config 0x399F, everything else 0."""
        self.config = ina219.POWER_ON_CONFIG
        self.calibration = 0
        self._decoded = ina219.decode_config(self.config)
        self._shunt_volts = 0.0
        self._bus_volts = 0.0
        self.shunt_raw = 0
        self.bus_counts = 0
        self.current_raw = 0
        self.power_raw = 0
        self.conversion_ready = False
        self.overflow = False

    @property
    def configuration(self) -> ina219.Ina219Config:
        """The configuration register, decoded."""
        return self._decoded

    # --- the analog side -------------------------------------------------------------------------
    def set_inputs(self, shunt_volts: float, bus_volts: float) -> None:
        """Apply voltages across the shunt and on the bus, and complete one conversion."""
        self._shunt_volts = shunt_volts
        self._bus_volts = bus_volts
        self._convert()

    def _convert(self) -> None:
        cfg = self._decoded
        overflow = False
        if cfg.measures_shunt:
            limit = cfg.shunt_full_scale_raw
            counts = _quantize(self._shunt_volts / ina219.SHUNT_LSB_VOLTS, cfg.shunt_adc.bits)
            if counts > limit or counts < -limit:
                counts = limit if counts > 0 else -limit
                overflow = True
            self.shunt_raw = counts & 0xFFFF
        if cfg.measures_bus:
            top = cfg.bus_range_volts * 250  # counts of 4 mV
            self.bus_counts = max(0, min(top, _quantize(self._bus_volts / ina219.BUS_LSB_VOLTS, cfg.bus_adc.bits)))
        if self.calibration:
            current = ina219.current_register(self.shunt_raw, self.calibration)
            if ina219.current_overflows(current):
                overflow = True
                current = max(-0x8000, min(0x7FFF, current))
            power = ina219.power_register(current, self.bus_counts << 3)
            if power > 0xFFFF:
                overflow = True
                power = 0xFFFF
            self.current_raw = current & 0xFFFF
            self.power_raw = power
        else:  # the chip computes nothing until it is calibrated
            self.current_raw = self.power_raw = 0
        self.overflow = overflow
        self.conversion_ready = cfg.mode != 0 and cfg.mode != 4

    # --- the register side -----------------------------------------------------------------------
    def read_register(self, register: int) -> int:
        if register == ina219.REG_CONFIG:
            return self.config
        if register == ina219.REG_SHUNT_VOLTAGE:
            return self.shunt_raw
        if register == ina219.REG_BUS_VOLTAGE:
            return ((self.bus_counts << 3) | (ina219.CNVR_BIT if self.conversion_ready else 0)
                    | (ina219.OVF_BIT if self.overflow else 0))
        if register == ina219.REG_POWER:
            self.conversion_ready = False  # datasheet: reading the power register clears CNVR
            return self.power_raw
        if register == ina219.REG_CURRENT:
            return self.current_raw
        if register == ina219.REG_CALIBRATION:
            return self.calibration
        raise OSError(errno.EIO, f"INA219 has no register 0x{register:02X}")

    def write_register(self, register: int, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"an INA219 register holds 16 bits, got {value!r}")
        if register == ina219.REG_CONFIG:
            if value & 0x8000:
                self.reset()
                return
            self.config = value
            self._decoded = ina219.decode_config(value)
            self.conversion_ready = False
        elif register == ina219.REG_CALIBRATION:
            self.calibration = value & 0xFFFE
        elif register in _READ_ONLY:
            return  # the chip ignores writes to its result registers
        else:
            raise OSError(errno.EIO, f"INA219 has no register 0x{register:02X}")


def _quantize(counts: float, bits: int) -> int:
    step = 1 << (12 - bits)
    return int(round(counts / step)) * step


class EmulatedI2C:
    """A stand-in for ``machine.I2C`` with register devices attached at 7-bit addresses."""

    def __init__(self, devices: dict[int, EmulatedINA219] | None = None):
        self.devices = dict(devices or {})

    def scan(self) -> list[int]:
        return sorted(self.devices)

    def _device(self, address: int) -> EmulatedINA219:
        device = self.devices.get(address)
        if device is None:
            raise OSError(errno.ENODEV, f"no I2C device answers at 0x{address:02X}")
        return device

    def readfrom_mem(self, address: int, register: int, nbytes: int) -> bytes:
        value = self._device(address).read_register(register)
        word = bytes(((value >> 8) & 0xFF, value & 0xFF))
        return (word * ((nbytes + 1) // 2))[:nbytes]

    def writeto_mem(self, address: int, register: int, buf: bytes) -> None:
        device = self._device(address)
        if len(buf) != 2:
            raise OSError(errno.EIO, f"INA219 registers take 2 bytes, got {len(buf)}")
        device.write_register(register, (buf[0] << 8) | buf[1])
