"""INA219 driver for the meter firmware (MicroPython; also runs on CPython).

Talks to any object with the ``machine.I2C`` memory methods
(``readfrom_mem(addr, reg, n)`` and ``writeto_mem(addr, reg, buf)``): the
Pico's I2C0 on the board, ``firmware_tools.ina219_model.EmulatedI2C`` in
tests and in the emulator. Registers are 16 bits, big-endian (TI SBOS448G,
section 8.5.6). The firmware forwards raw register values; the host converts
them, so this driver does no arithmetic.
"""

REG_CONFIG = 0x00
REG_SHUNT_VOLTAGE = 0x01
REG_BUS_VOLTAGE = 0x02
REG_POWER = 0x03
REG_CURRENT = 0x04
REG_CALIBRATION = 0x05
RESET_BIT = 0x8000


class INA219:
    """One INA219 on an I2C bus (default address 0x40: A0 and A1 tied to GND)."""

    def __init__(self, i2c, address=0x40):
        self.i2c = i2c
        self.address = address

    def read_register(self, register):
        data = self.i2c.readfrom_mem(self.address, register, 2)
        return (data[0] << 8) | data[1]

    def write_register(self, register, value):
        self.i2c.writeto_mem(self.address, register, bytes(((value >> 8) & 0xFF, value & 0xFF)))

    def reset(self):
        """Power-on reset: every register back to its default (calibration 0)."""
        self.write_register(REG_CONFIG, RESET_BIT)

    def configure(self, config):
        self.write_register(REG_CONFIG, config & 0x7FFF)

    def read_config(self):
        return self.read_register(REG_CONFIG)

    def calibrate(self, calibration):
        self.write_register(REG_CALIBRATION, calibration)

    def read_calibration(self):
        return self.read_register(REG_CALIBRATION)

    def read_raw(self):
        """(shunt voltage register, bus voltage register), both raw 16-bit values."""
        return self.read_register(REG_SHUNT_VOLTAGE), self.read_register(REG_BUS_VOLTAGE)
