"""INA219 conversions against the datasheet (TI SBOS448G), and the emulated chip against them."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.meter import ina219
from edge.meter.errors import ConversionError, MeterError
from firmware_tools.ina219_model import EmulatedI2C, EmulatedINA219
from firmware_tools.meter_firmware.ina219 import INA219
from firmware_tools.meter_firmware.main import calibration_value


# --- calibration (datasheet 8.5.1: Cal = trunc(0.04096 / (Current_LSB * R_shunt))) ----------------
@pytest.mark.parametrize("shunt, lsb, expected", [
    (0.1, 100e-6, 4096),       # the task's vector: 0.1 ohm, 100 uA
    (0.1, 1e-3, 408),          # 409.6 truncated, bit 0 cleared
    (0.08, 100e-6, 5120),
    (0.01, 100e-6, 40960),
    (0.5, 50e-6, 1638),        # 1638.4 truncated
    (0.1, 97.65625e-6, 4194),  # 3.2 A / 2^15 LSB: 4194.3 truncated
])
def test_calibration_register_follows_the_datasheet_equation(shunt, lsb, expected):
    assert ina219.calibration_register(shunt, lsb) == expected


def test_calibration_bit_zero_is_never_set():
    assert ina219.calibration_register(0.1, 0.04096 / (4097 * 0.1)) == 4096


@pytest.mark.parametrize("shunt, lsb", [(0.1, 1e-9), (0.0, 1e-4), (0.1, -1e-4), (1e6, 1.0)])
def test_calibration_out_of_range_is_a_clear_error(shunt, lsb):
    with pytest.raises(ConversionError) as info:
        ina219.calibration_register(shunt, lsb)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MeterError)
    assert "ohm" in str(info.value) or "positive" in str(info.value)


def test_current_lsb_helpers_invert_the_calibration():
    assert ina219.current_lsb_for(3.2) == pytest.approx(97.65625e-6)
    assert ina219.current_lsb_from_calibration(4096, 0.1) == pytest.approx(100e-6)
    with pytest.raises(ConversionError):
        ina219.current_lsb_from_calibration(0, 0.1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000))
def test_firmware_calibration_matches_the_host(milliohm, microamps):
    expected = calibration_value(milliohm, microamps)
    try:
        host = ina219.calibration_register(milliohm / 1000, microamps / 1e6)
    except ConversionError:
        host = 0
    assert host == expected


# --- shunt voltage register ------------------------------------------------------------------------
def test_shunt_register_fc18_reads_minus_10_mv():
    assert ina219.shunt_voltage(0xFC18) == pytest.approx(-0.010, abs=1e-12)


# Full scale of every PGA range: 4000 counts (40 mV) per gain step, two's complement when negative.
@pytest.mark.parametrize("raw, millivolts", [
    (0x7D00, 320.0), (0x8300, -320.0),   # PGA /8
    (0x3E80, 160.0), (0xC180, -160.0),   # PGA /4
    (0x1F40, 80.0), (0xE0C0, -80.0),     # PGA /2
    (0x0FA0, 40.0), (0xF060, -40.0),     # PGA /1
    (0x0000, 0.0), (0x0001, 0.01), (0xFFFF, -0.01),
])
def test_shunt_register_full_scale_of_each_pga_range(raw, millivolts):
    assert ina219.shunt_voltage(raw) * 1e3 == pytest.approx(millivolts, abs=1e-9)


@pytest.mark.parametrize("gain, full_scale_raw", [(1, 4000), (2, 8000), (4, 16000), (8, 32000)])
def test_each_pga_setting_decodes_its_range(gain, full_scale_raw):
    cfg = ina219.decode_config(ina219.encode_config(pga_gain=gain))
    assert cfg.pga_gain == gain
    assert cfg.shunt_full_scale_raw == full_scale_raw
    assert cfg.shunt_range_volts == pytest.approx(0.04 * gain)
    assert ina219.shunt_voltage(full_scale_raw) == pytest.approx(cfg.shunt_range_volts)
    assert cfg.max_current_amps(0.1) == pytest.approx(0.4 * gain)


# --- bus voltage register ---------------------------------------------------------------------------
def test_bus_register_2712_reads_5_volts_ready_no_overflow():
    assert ina219.bus_voltage(0x2712) == (5.0, True, False)


@pytest.mark.parametrize("raw, volts, ready, overflow", [
    (8000 << 3, 32.0, False, False),     # 32 V range full scale (8000 counts of 4 mV)
    (4000 << 3, 16.0, False, False),     # 16 V range full scale
    ((1250 << 3) | 0x1, 5.0, False, True),
    ((1250 << 3) | 0x3, 5.0, True, True),
    (0x0008, 0.004, False, False),       # one LSB
])
def test_bus_register_bits(raw, volts, ready, overflow):
    assert ina219.bus_voltage(raw) == (pytest.approx(volts), ready, overflow)


@pytest.mark.parametrize("bad", [-1, 0x10000, 1.5, "0x2712", True])
def test_register_values_must_be_16_bit_integers(bad):
    with pytest.raises(ConversionError, match="0..0xFFFF"):
        ina219.bus_voltage(bad)


# --- current and power registers (datasheet 8.5.2) ---------------------------------------------------
def test_current_and_power_like_the_chip():
    # 10 mV across 0.1 ohm = 100 mA; Cal 4096 -> current register 1000 (LSB 100 uA); 5 V bus.
    assert ina219.current_register(0x03E8, 4096) == 1000
    assert ina219.current(0x03E8, 4096, 100e-6) == pytest.approx(0.1)
    assert ina219.power_register(1000, 0x2712) == 250          # 1000 * 1250 / 5000, LSB 2 mW
    assert ina219.power(0x03E8, 0x2712, 4096, 100e-6) == pytest.approx(0.5)
    assert ina219.current(0xFC18, 4096, 100e-6) == pytest.approx(-0.1)


def test_current_truncates_toward_zero_like_a_signed_division():
    assert ina219.current_register(0x0003, 2048) == 1      # 1.5 -> 1
    assert ina219.current_register(0xFFFD, 2048) == -1     # -1.5 -> -1
    assert ina219.current_overflows(40000) and not ina219.current_overflows(32767)


# --- configuration register (datasheet 8.6.2.1) -----------------------------------------------------
def test_power_on_configuration():
    cfg = ina219.decode_config(0x399F)
    assert (cfg.bus_range_volts, cfg.pga_gain, cfg.mode_name) == (32, 8, "shunt and bus continuous")
    assert (cfg.bus_adc.bits, cfg.bus_adc.samples, cfg.shunt_adc.bits) == (12, 1, 12)
    assert cfg.cycle_seconds == pytest.approx(2 * 532e-6)
    assert not cfg.reset and cfg.continuous and cfg.measures_bus and cfg.measures_shunt
    assert ina219.encode_config() == ina219.POWER_ON_CONFIG


@pytest.mark.parametrize("field, bits, samples, seconds", [
    (0b0000, 9, 1, 84e-6), (0b0001, 10, 1, 148e-6), (0b0010, 11, 1, 276e-6), (0b0011, 12, 1, 532e-6),
    (0b1000, 12, 1, 532e-6), (0b1001, 12, 2, 1.06e-3), (0b1010, 12, 4, 2.13e-3), (0b1011, 12, 8, 4.26e-3),
    (0b1100, 12, 16, 8.51e-3), (0b1101, 12, 32, 17.02e-3), (0b1110, 12, 64, 34.05e-3),
    (0b1111, 12, 128, 68.10e-3),
])
def test_adc_settings_and_their_conversion_times(field, bits, samples, seconds):
    adc = ina219.decode_adc(field)
    assert (adc.bits, adc.samples) == (bits, samples)
    assert adc.conversion_seconds == pytest.approx(seconds)
    assert ina219.decode_adc(ina219.encode_adc(bits, samples)) == adc


def test_every_configuration_round_trips():
    for bus in (16, 32):
        for gain in ina219.PGA_GAINS:
            for mode in range(8):
                for bits in (9, 10, 11, 12):
                    raw = ina219.encode_config(bus_range_volts=bus, pga_gain=gain, bus_bits=bits, shunt_samples=8,
                                               mode=mode)
                    cfg = ina219.decode_config(raw)
                    assert (cfg.bus_range_volts, cfg.pga_gain, cfg.mode, cfg.bus_adc.bits, cfg.shunt_adc.samples) \
                        == (bus, gain, mode, bits, 8)
    assert ina219.decode_config(0x8000).reset
    assert ina219.decode_config(0x0000).mode_name == "power-down"
    assert "PGA /8" in ina219.decode_config(0x399F).describe()


@pytest.mark.parametrize("kwargs, message", [
    ({"pga_gain": 3}, "PGA gain"), ({"bus_range_volts": 24}, "bus range"), ({"mode": 9}, "mode"),
    ({"bus_bits": 8}, "resolution"), ({"shunt_samples": 3}, "averaging"),
])
def test_bad_configuration_settings_are_named(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        ina219.encode_config(**kwargs)


def test_pga_choice_for_a_current_range():
    assert ina219.pga_for_current(3.0, 0.1) == 8      # Pi 4 / Pi 5
    assert ina219.pga_for_current(0.6, 0.1) == 2      # Pi Zero 2 W
    assert ina219.pga_for_current(0.3, 0.1) == 1
    with pytest.raises(ConversionError, match="smaller shunt"):
        ina219.pga_for_current(5.0, 0.1)


# --- the emulated chip ------------------------------------------------------------------------------
def _chip_on_bus():
    chip = EmulatedINA219()
    return chip, INA219(EmulatedI2C({0x40: chip}))


def test_emulated_chip_registers_decode_to_its_inputs():
    chip, dev = _chip_on_bus()
    dev.calibrate(4096)
    chip.set_inputs(shunt_volts=0.0731, bus_volts=4.953)
    shunt, bus = dev.read_raw()
    assert ina219.shunt_voltage(shunt) == pytest.approx(0.0731, abs=5e-6)
    volts, ready, overflow = ina219.bus_voltage(bus)
    assert volts == pytest.approx(4.953, abs=0.002) and ready and not overflow
    assert dev.read_register(ina219.REG_CURRENT) == ina219.current_register(shunt, 4096)
    assert dev.read_register(ina219.REG_POWER) == ina219.power_register(ina219.current_register(shunt, 4096), bus)
    # Reading the power register clears CNVR.
    assert not ina219.bus_voltage(dev.read_register(ina219.REG_BUS_VOLTAGE))[1]


def test_emulated_chip_saturates_and_flags_overflow_beyond_the_pga_range():
    chip, dev = _chip_on_bus()
    dev.calibrate(4096)
    dev.configure(ina219.encode_config(pga_gain=2))
    chip.set_inputs(shunt_volts=0.12, bus_volts=5.0)
    shunt, bus = dev.read_raw()
    assert ina219.signed16(shunt) == 8000
    assert ina219.bus_voltage(bus)[2]
    chip.set_inputs(shunt_volts=-0.05, bus_volts=5.0)
    shunt, bus = dev.read_raw()
    assert ina219.signed16(shunt) == -5000 and not ina219.bus_voltage(bus)[2]


def test_emulated_chip_current_overflow_sets_ovf():
    chip, dev = _chip_on_bus()
    dev.calibrate(0xFFFE)  # a tiny current LSB: the current register overflows long before the shunt does
    chip.set_inputs(shunt_volts=0.05, bus_volts=5.0)
    assert ina219.bus_voltage(dev.read_raw()[1])[2]


def test_emulated_chip_reset_calibration_bit_and_lower_resolutions():
    chip, dev = _chip_on_bus()
    dev.calibrate(4097)
    assert dev.read_calibration() == 4096
    dev.configure(ina219.encode_config(bus_bits=9, shunt_bits=9))
    chip.set_inputs(shunt_volts=0.01234, bus_volts=5.0)
    shunt, _ = dev.read_raw()
    assert ina219.signed16(shunt) % 8 == 0  # 9-bit: steps of 8 register counts
    dev.reset()
    assert dev.read_config() == 0x399F and dev.read_calibration() == 0
    dev.write_register(ina219.REG_SHUNT_VOLTAGE, 0x1234)  # read-only: ignored
    assert dev.read_register(ina219.REG_SHUNT_VOLTAGE) == 0


def test_emulated_bus_answers_like_machine_i2c():
    bus = EmulatedI2C({0x40: EmulatedINA219()})
    assert bus.scan() == [0x40]
    assert bus.readfrom_mem(0x40, 0x00, 2) == b"\x39\x9f"
    with pytest.raises(OSError) as info:
        bus.readfrom_mem(0x41, 0x00, 2)
    assert info.value.errno == errno.ENODEV
    with pytest.raises(OSError):
        bus.writeto_mem(0x40, 0x05, b"\x10")
    with pytest.raises(OSError):
        bus.readfrom_mem(0x40, 0x09, 2)
