"""INA219 register conversions, from the TI datasheet (SBOS448G).

Pure functions over raw 16-bit register values; no I/O. The meter sends the
raw shunt and bus registers and the host converts them here, so scaling and
calibration live in one place::

    >>> from edge.meter import ina219
    >>> ina219.calibration_register(0.1, 100e-6)
    4096
    >>> ina219.bus_voltage(0x2712)
    (5.0, True, False)
    >>> round(ina219.shunt_voltage(0xFC18) * 1e3, 2)
    -10.0

Datasheet facts used (section 8.6, register maps, and 8.5.1, calibration):

- shunt voltage register: signed two's complement, LSB 10 uV; full scale
  +-40, +-80, +-160, +-320 mV for PGA gain /1, /2, /4, /8 (4000 counts per 40 mV);
- bus voltage register: voltage in bits 15..3 with LSB 4 mV, bit 1 CNVR
  (conversion ready), bit 0 OVF (math overflow: current and power invalid);
- Cal = trunc(0.04096 / (current_LSB * R_shunt)); bit 0 of the calibration
  register is not used and reads 0;
- current register = shunt register * Cal / 4096, in units of current_LSB;
- power register = current register * bus register / 5000, power LSB = 20 * current_LSB;
- ADC: 9/10/11/12-bit conversions take 84/148/276/532 us; averaging 2..128
  12-bit samples takes 1.06, 2.13, 4.26, 8.51, 17.02, 34.05, 68.10 ms;
- power-on configuration 0x399F: 32 V bus range, PGA /8, 12-bit shunt and
  bus, shunt and bus continuous.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.meter.errors import ConversionError

REG_CONFIG = 0x00
REG_SHUNT_VOLTAGE = 0x01
REG_BUS_VOLTAGE = 0x02
REG_POWER = 0x03
REG_CURRENT = 0x04
REG_CALIBRATION = 0x05

POWER_ON_CONFIG = 0x399F
SHUNT_LSB_VOLTS = 10e-6
BUS_LSB_VOLTS = 4e-3
CALIBRATION_SCALE = 0.04096  # the datasheet's fixed internal scaling constant
SHUNT_COUNTS_PER_GAIN = 4000  # 40 mV / 10 uV at PGA /1
POWER_LSB_FACTOR = 20

CNVR_BIT = 0x0002
OVF_BIT = 0x0001

PGA_GAINS = (1, 2, 4, 8)
MODE_NAMES = (
    "power-down",
    "shunt triggered",
    "bus triggered",
    "shunt and bus triggered",
    "ADC off",
    "shunt continuous",
    "bus continuous",
    "shunt and bus continuous",
)
# Conversion time of one result: by resolution (no averaging), by sample count (12-bit averaged).
_RESOLUTION_SECONDS = {9: 84e-6, 10: 148e-6, 11: 276e-6, 12: 532e-6}
_AVERAGING_SECONDS = {
    1: 532e-6, 2: 1.06e-3, 4: 2.13e-3, 8: 4.26e-3,
    16: 8.51e-3, 32: 17.02e-3, 64: 34.05e-3, 128: 68.10e-3,
}


def _check_register(raw: int, name: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 0xFFFF:
        raise ConversionError(f"{name} must be a 16-bit register value 0..0xFFFF, got {raw!r}")
    return raw


def signed16(raw: int) -> int:
    """Two's complement value of a 16-bit register (0xFC18 -> -1000)."""
    raw = _check_register(raw, "register")
    return raw - 0x10000 if raw & 0x8000 else raw


def calibration_register(shunt_ohms: float, current_lsb_amps: float) -> int:
    """Calibration register for a shunt and a chosen current LSB.

    ``Cal = trunc(0.04096 / (current_LSB * R_shunt))`` with bit 0 cleared (it is
    not writable on the chip). Raises ConversionError when the result does not
    fit the register (1..0xFFFE): pick a larger current LSB or a larger shunt.

        >>> calibration_register(0.1, 100e-6)
        4096
    """
    if not shunt_ohms > 0 or not current_lsb_amps > 0:
        raise ConversionError(
            f"shunt resistance and current LSB must be positive, got {shunt_ohms!r} ohm and {current_lsb_amps!r} A")
    # round() first so 0.04096 / 1e-5 (= 4095.9999...) truncates to the exact 4096.
    cal = int(round(CALIBRATION_SCALE / (current_lsb_amps * shunt_ohms), 9))
    if 0 < cal <= 0xFFFF:
        cal &= 0xFFFE
    if not 0 < cal <= 0xFFFE:
        raise ConversionError(
            f"calibration {cal} for {shunt_ohms} ohm and {current_lsb_amps} A/LSB does not fit the 16-bit register "
            "(needs 1..65534): choose a current LSB between max_current/32768 and 8x that")
    return cal


def current_lsb_for(max_expected_amps: float) -> float:
    """Smallest current LSB that still covers ``max_expected_amps`` (datasheet: I_max / 2^15)."""
    if not max_expected_amps > 0:
        raise ConversionError(f"maximum expected current must be positive, got {max_expected_amps!r} A")
    return max_expected_amps / 32768


def current_lsb_from_calibration(calibration: int, shunt_ohms: float) -> float:
    """The current LSB a calibration register value implies for a shunt (inverse of the Cal equation)."""
    calibration = _check_register(calibration, "calibration")
    if calibration == 0 or not shunt_ohms > 0:
        raise ConversionError(
            f"need a non-zero calibration and a positive shunt, got Cal={calibration} and {shunt_ohms!r} ohm")
    return CALIBRATION_SCALE / (calibration * shunt_ohms)


def shunt_voltage(raw: int) -> float:
    """Shunt voltage register to volts (signed, LSB 10 uV): 0xFC18 -> -0.010."""
    return signed16(raw) * SHUNT_LSB_VOLTS


def bus_voltage(raw: int) -> tuple[float, bool, bool]:
    """Bus voltage register to ``(volts, conversion_ready, overflow)``.

    Bits 15..3 hold the voltage (LSB 4 mV), bit 1 is CNVR, bit 0 is OVF.

        >>> bus_voltage(0x2712)
        (5.0, True, False)
    """
    raw = _check_register(raw, "bus voltage register")
    return round((raw >> 3) * BUS_LSB_VOLTS, 3), bool(raw & CNVR_BIT), bool(raw & OVF_BIT)


def current_register(shunt_raw: int, calibration: int) -> int:
    """What the chip computes into its current register: shunt * Cal / 4096, truncated toward zero.

    The result may fall outside the signed 16-bit range; the chip then sets OVF
    (see ``current_overflows``).
    """
    product = signed16(shunt_raw) * _check_register(calibration, "calibration")
    return -((-product) // 4096) if product < 0 else product // 4096


def current_overflows(current_reg: int) -> bool:
    """True when a current register value does not fit 16 signed bits (chip sets OVF)."""
    return not -0x8000 <= current_reg <= 0x7FFF


def current(shunt_raw: int, calibration: int, current_lsb_amps: float) -> float:
    """Current in amperes as the chip reports it: current register * current LSB.

        >>> current(0x03E8, 4096, 100e-6)   # 10 mV over 0.1 ohm
        0.1
    """
    return round(current_register(shunt_raw, calibration) * current_lsb_amps, 12)


def power_register(current_reg: int, bus_raw: int) -> int:
    """What the chip computes into its power register: |current| * bus / 5000, truncated.

    The power register is unsigned; a value above 0xFFFF overflows (chip sets OVF).
    """
    bus_counts = _check_register(bus_raw, "bus voltage register") >> 3
    return abs(current_reg) * bus_counts // 5000


def power(shunt_raw: int, bus_raw: int, calibration: int, current_lsb_amps: float) -> float:
    """Power in watts as the chip's power register reports it (LSB = 20 * current LSB).

    The reader itself multiplies bus volts by current at full resolution; this
    function reproduces the chip's coarser register, e.g. to compare with it.
    """
    reg = power_register(current_register(shunt_raw, calibration), bus_raw)
    return round(reg * POWER_LSB_FACTOR * current_lsb_amps, 12)


@dataclass(frozen=True)
class AdcSetting:
    """One ADC field of the configuration register: resolution, averaged samples, conversion time."""

    bits: int
    samples: int
    conversion_seconds: float

    def __str__(self) -> str:
        if self.samples == 1:
            return f"{self.bits}-bit ({self.conversion_seconds * 1e6:.0f} us)"
        return f"{self.samples} x 12-bit averaged ({self.conversion_seconds * 1e3:.2f} ms)"


def decode_adc(field: int) -> AdcSetting:
    """Decode a 4-bit BADC/SADC field: ``0X..`` = 9..12-bit single, ``1nnn`` = 2^n averaged 12-bit samples."""
    if not 0 <= field <= 0xF:
        raise ConversionError(f"an ADC field is 4 bits (0..15), got {field!r}")
    if field & 0x8:
        samples = 1 << (field & 0x7)
        return AdcSetting(12, samples, _AVERAGING_SECONDS[samples])
    bits = 9 + (field & 0x3)
    return AdcSetting(bits, 1, _RESOLUTION_SECONDS[bits])


def encode_adc(bits: int = 12, samples: int = 1) -> int:
    """The 4-bit ADC field for a resolution (9..12, single sample) or a 12-bit average of 2..128 samples."""
    if samples == 1:
        if bits not in _RESOLUTION_SECONDS:
            raise ConversionError(f"ADC resolution must be 9, 10, 11 or 12 bits, got {bits!r}")
        return bits - 9
    if samples not in _AVERAGING_SECONDS or bits != 12:
        raise ConversionError(
            f"averaging takes 12-bit samples and a count of 1, 2, 4, ..., 128, got {bits!r} bits x {samples!r}")
    return 0x8 | (samples.bit_length() - 1)


@dataclass(frozen=True)
class Ina219Config:
    """The configuration register, decoded (datasheet 8.6.2.1)."""

    raw: int
    reset: bool
    bus_range_volts: int
    pga_gain: int
    bus_adc: AdcSetting
    shunt_adc: AdcSetting
    mode: int

    @property
    def shunt_range_volts(self) -> float:
        """Shunt full scale: 0.04 V times the PGA gain."""
        return 0.04 * self.pga_gain

    @property
    def shunt_full_scale_raw(self) -> int:
        """Largest magnitude the shunt register reaches at this PGA setting (4000 counts per gain step)."""
        return SHUNT_COUNTS_PER_GAIN * self.pga_gain

    @property
    def mode_name(self) -> str:
        return MODE_NAMES[self.mode]

    @property
    def measures_shunt(self) -> bool:
        return self.mode in (1, 3, 5, 7)

    @property
    def measures_bus(self) -> bool:
        return self.mode in (2, 3, 6, 7)

    @property
    def continuous(self) -> bool:
        return self.mode >= 5

    @property
    def cycle_seconds(self) -> float:
        """Time for one complete set of conversions in this mode (shunt then bus when both run)."""
        total = 0.0
        if self.measures_shunt:
            total += self.shunt_adc.conversion_seconds
        if self.measures_bus:
            total += self.bus_adc.conversion_seconds
        return total

    def max_current_amps(self, shunt_ohms: float) -> float:
        """Largest current this PGA range can measure through ``shunt_ohms``."""
        return self.shunt_range_volts / shunt_ohms

    def describe(self) -> str:
        return (f"0x{self.raw:04X}: bus {self.bus_range_volts} V range, PGA /{self.pga_gain} "
                f"(+-{self.shunt_range_volts * 1e3:.0f} mV), shunt ADC {self.shunt_adc}, bus ADC {self.bus_adc}, "
                f"mode {self.mode_name}")


def decode_config(raw: int) -> Ina219Config:
    """Decode the configuration register.

        >>> c = decode_config(0x399F)
        >>> c.bus_range_volts, c.pga_gain, c.shunt_adc.bits, c.mode_name
        (32, 8, 12, 'shunt and bus continuous')
    """
    raw = _check_register(raw, "configuration register")
    return Ina219Config(
        raw=raw,
        reset=bool(raw & 0x8000),
        bus_range_volts=32 if raw & 0x2000 else 16,
        pga_gain=PGA_GAINS[(raw >> 11) & 0x3],
        bus_adc=decode_adc((raw >> 7) & 0xF),
        shunt_adc=decode_adc((raw >> 3) & 0xF),
        mode=raw & 0x7,
    )


def encode_config(*, bus_range_volts: int = 32, pga_gain: int = 8, bus_bits: int = 12, bus_samples: int = 1,
                  shunt_bits: int = 12, shunt_samples: int = 1, mode: int = 7) -> int:
    """Build a configuration register value; the defaults give the power-on value 0x399F.

        >>> hex(encode_config(bus_range_volts=16, pga_gain=4))
        '0x119f'
    """
    if bus_range_volts not in (16, 32):
        raise ConversionError(f"bus range must be 16 or 32 V, got {bus_range_volts!r}")
    if pga_gain not in PGA_GAINS:
        raise ConversionError(f"PGA gain must be one of 1, 2, 4, 8 (40..320 mV), got {pga_gain!r}")
    if not 0 <= mode <= 7:
        raise ConversionError(f"mode must be 0..7, got {mode!r}")
    return ((0x2000 if bus_range_volts == 32 else 0) | (PGA_GAINS.index(pga_gain) << 11)
            | (encode_adc(bus_bits, bus_samples) << 7) | (encode_adc(shunt_bits, shunt_samples) << 3) | mode)


def pga_for_current(max_amps: float, shunt_ohms: float) -> int:
    """Smallest PGA gain whose range covers ``max_amps`` through ``shunt_ohms`` (finest resolution)."""
    needed = max_amps * shunt_ohms
    for gain in PGA_GAINS:
        if needed <= 0.04 * gain:
            return gain
    raise ConversionError(
        f"{max_amps} A through {shunt_ohms} ohm makes {needed * 1e3:.0f} mV, above the 320 mV maximum: use a smaller shunt")
