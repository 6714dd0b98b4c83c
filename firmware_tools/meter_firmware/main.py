"""qfl meter firmware: an INA219 on a Raspberry Pi Pico (RP2040), streamed over USB serial.

MicroPython. Copy ``main.py`` and ``ina219.py`` to the board (see
``firmware_tools/flash.py``); it boots, prints its identification line and
waits for commands. The protocol is docs/meter-protocol.md; wiring is
docs/hardware.md (INA219 on I2C0: GP4 = SDA, GP5 = SCL, address 0x40).

Hardware sits behind a small shim: on the board ``main()`` builds the I2C bus
from ``machine`` and uses the USB serial port (sys.stdin/stdout); on CPython
(no ``machine`` module) the same ``Meter`` class takes an injected bus, for
instance the emulated INA219 of ``firmware_tools.ina219_model``, and an
injected writer, which is how the tests and the meter emulator run this very
file. Written in the subset of Python that MicroPython runs: no f-strings,
no dataclasses, no type annotations.

The firmware forwards raw registers and never converts them: calibration and
scaling live on the host (``edge.meter.ina219``).
"""

import sys
import time

try:
    import machine
except ImportError:  # CPython: the tests and the emulator inject a bus and a port
    machine = None

try:
    from .ina219 import INA219  # CPython, imported as firmware_tools.meter_firmware.main
except ImportError:
    from ina219 import INA219  # the board: both files sit side by side on the flash

PROTOCOL = 1
FIRMWARE = "1.0.0"
MIN_RATE_HZ = 1
MAX_RATE_HZ = 5000
MAX_COMMAND_CHARS = 80
DEFAULT_CONFIG = 0x399F  # the chip's power-on value: 32 V range, PGA /8, 12-bit, continuous
DEFAULT_SHUNT_MILLIOHM = 100
DEFAULT_CURRENT_LSB_UA = 100

# Error codes of E lines (docs/meter-protocol.md).
E_UNKNOWN_COMMAND = 1
E_BAD_ARGUMENT = 2
E_BAD_CRC = 3
E_I2C = 4
E_TOO_LONG = 5
E_OVERRUN = 6


def _crc_table():
    table = bytearray(256)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table[byte] = crc
    return bytes(table)


# The host has its own CRC in edge.meter.protocol: the board cannot import the
# host package, so the 8 lines are kept on both sides and tested against each other.
_CRC_TABLE = _crc_table()


def crc8(data):
    """CRC-8, polynomial 0x07, init 0, of a bytes object."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = table[crc ^ byte]
    return crc


def frame(body):
    """A complete line: body, '*', two hex digits of CRC-8, newline."""
    return "%s*%02X\n" % (body, crc8(body.encode()))


def calibration_value(shunt_milliohm, current_lsb_ua):
    """INA219 calibration register: trunc(0.04096 / (LSB * R)) with bit 0 cleared (0 if it does not fit)."""
    value = int(40960000.0 / (current_lsb_ua * shunt_milliohm) + 1e-6)
    if value < 2 or value > 0xFFFF:
        return 0
    return value & 0xFFFE


def _number(text, what):
    try:
        value = float(text)
    except ValueError:
        raise ValueError("%s must be a number, got %s" % (what, text[:16]))
    if not value > 0 or value > 1e9:
        raise ValueError("%s must be positive, got %s" % (what, text[:16]))
    return value


def _format_number(value):
    if value == int(value):
        return "%d" % int(value)
    return "%g" % value


class Meter:
    """The meter's state and its protocol: commands in, identification, samples and errors out."""

    def __init__(self, ina, write, meter_id="qflm", shunt_milliohm=DEFAULT_SHUNT_MILLIOHM,
                 current_lsb_ua=DEFAULT_CURRENT_LSB_UA, config=DEFAULT_CONFIG, max_rate_hz=MAX_RATE_HZ):
        self.ina = ina
        self.write = write
        self.meter_id = meter_id
        self.shunt_milliohm = shunt_milliohm
        self.current_lsb_ua = current_lsb_ua
        self.config = config
        self.calibration = 0
        self.running = False
        self.rate_hz = 0
        self.period_us = 0
        self.seq = 0
        self.overruns = 0
        self.max_rate_hz = max_rate_hz
        self._pending = ""
        self._discarding = False
        try:
            self.ina.configure(config)
            self.config = self.ina.read_config()
            self._calibrate(shunt_milliohm, current_lsb_ua)
        except OSError as exc:
            self.error(E_I2C, "INA219 not answering: %s" % exc)

    def send(self, body):
        self.write(frame(body))

    def error(self, code, text):
        self.send("E,%d,%s" % (code, text.replace("*", "#").replace("\n", " ").replace("\r", " ")))

    def identify(self):
        self.send("#QFLM,%d,%s,%s,%s,%04X,%04X" % (PROTOCOL, self.meter_id, FIRMWARE,
                                                   _format_number(self.shunt_milliohm), self.config,
                                                   self.calibration))

    def feed(self, text):
        """Characters from the host; complete lines (CR or LF terminated) are handled as commands."""
        buf = self._pending + text
        while True:
            cut = -1
            for end in ("\n", "\r"):
                i = buf.find(end)
                if i >= 0 and (cut < 0 or i < cut):
                    cut = i
            if cut < 0:
                break
            line = buf[:cut]
            buf = buf[cut + 1:]
            if self._discarding:  # the rest of a command already reported as too long
                self._discarding = False
            elif len(line) > MAX_COMMAND_CHARS:
                self.error(E_TOO_LONG, "command longer than %d characters dropped" % MAX_COMMAND_CHARS)
            elif line.strip():
                self.handle(line)
        if len(buf) > MAX_COMMAND_CHARS:
            if not self._discarding:
                self.error(E_TOO_LONG, "command longer than %d characters dropped" % MAX_COMMAND_CHARS)
            self._discarding = True
            buf = ""
        self._pending = buf

    def handle(self, line):
        """Carry out one command line (with or without its *HH checksum); always answers one line."""
        line = line.strip()
        star = line.rfind("*")
        if star >= 0:
            body = line[:star]
            try:
                given = int(line[star + 1:], 16)
            except ValueError:
                given = -1
            if len(line) - star != 3 or given != crc8(body.encode()):
                self.error(E_BAD_CRC, "bad checksum, command ignored: %s" % body[:24])
                return
            line = body
        words = line.split()
        if not words:
            self.error(E_UNKNOWN_COMMAND, "empty command; use START, STOP, ID?, CAL, CFG")
            return
        name = words[0].upper()
        args = words[1:]
        try:
            if name == "START":
                self._start(args)
            elif name == "STOP":
                self.running = False
                self.send("OK,STOP,%d" % self.seq)
            elif name == "ID?":
                self.identify()
            elif name == "CAL":
                self._cal(args)
            elif name == "CFG":
                self._cfg(args)
            else:
                self.error(E_UNKNOWN_COMMAND, "unknown command %s; use START, STOP, ID?, CAL, CFG" % name[:16])
        except ValueError as exc:
            self.error(E_BAD_ARGUMENT, str(exc))
        except OSError as exc:
            self.error(E_I2C, "INA219 not answering: %s" % exc)

    def _start(self, args):
        if len(args) != 1 or not args[0].isdigit() or not MIN_RATE_HZ <= int(args[0]) <= MAX_RATE_HZ:
            raise ValueError("START takes one rate in Hz, %d..%d, e.g. START 1000" % (MIN_RATE_HZ, MAX_RATE_HZ))
        self.rate_hz = min(int(args[0]), self.max_rate_hz)  # the OK line tells the host the rate it got
        self.period_us = 1000000 // self.rate_hz
        self.running = True
        self.send("OK,START,%d" % self.rate_hz)

    def _cal(self, args):
        if len(args) != 2:
            raise ValueError("CAL takes the shunt in milliohm and the current LSB in microamps, e.g. CAL 100 100")
        shunt = _number(args[0], "shunt milliohm")
        lsb = _number(args[1], "current LSB microamps")
        self._calibrate(shunt, lsb)
        self.send("OK,CAL,%s,%s,%04X" % (_format_number(shunt), _format_number(lsb), self.calibration))

    def _calibrate(self, shunt, lsb):
        value = calibration_value(shunt, lsb)
        if value == 0:
            raise ValueError("calibration for %s mOhm and %s uA does not fit 16 bits; choose another LSB"
                             % (_format_number(shunt), _format_number(lsb)))
        self.ina.calibrate(value)
        self.calibration = self.ina.read_calibration()
        self.shunt_milliohm = shunt
        self.current_lsb_ua = lsb

    def _cfg(self, args):
        if len(args) != 1 or not 1 <= len(args[0]) <= 4:
            raise ValueError("CFG takes the INA219 configuration register in hex, e.g. CFG 399F")
        try:
            value = int(args[0], 16)
        except ValueError:
            raise ValueError("CFG takes a hex value, got %s" % args[0][:8])
        if value & 0x8000:  # reset: power-on configuration; the chip forgets its calibration, so write it again
            self.ina.reset()
            self._calibrate(self.shunt_milliohm, self.current_lsb_ua)
        else:
            self.ina.configure(value)
        self.config = self.ina.read_config()
        self.send("OK,CFG,%04X" % self.config)

    def sample(self, t_us):
        """Read both registers and send one S line stamped ``t_us`` (meter microseconds since boot)."""
        try:
            shunt, bus = self.ina.read_raw()
        except OSError as exc:
            self.error(E_I2C, "INA219 read failed: %s" % exc)
            return
        body = "S,%d,%d,%04X,%04X" % (self.seq, t_us, shunt, bus)
        self.write("%s*%02X\n" % (body, crc8(body.encode())))
        self.seq += 1


class UsbSerial:
    """The board's USB serial port: sys.stdin and sys.stdout, polled so the loop never blocks."""

    def __init__(self):
        import select

        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)

    def write(self, text):
        sys.stdout.write(text)

    def read_available(self):
        chars = []
        while len(chars) < 128 and self._poll.poll(0):
            chars.append(sys.stdin.read(1))
        return "".join(chars)

    def wait(self, ms):
        """Sleep up to ``ms`` milliseconds, waking early when the host sends something."""
        self._poll.poll(ms)


def run(meter, port, ticks_us, ticks_diff, sleep_us, alive=None):
    """The sampling loop: commands from ``port``, one sample per period while running.

    ``ticks_us``/``ticks_diff``/``sleep_us`` are MicroPython's time functions
    on the board (``ticks_us`` wraps at 2**30, so the loop keeps its own
    unwrapped microsecond count); ``alive()`` returning False ends the loop
    (CPython only; on the board it runs until reset). A sample that cannot be
    taken on time is skipped, not bunched up: the slots are counted and
    reported at most once a second as ``E,6``.
    """
    last = ticks_us()
    now = 0
    due = 0
    started = False
    reported = 0
    while alive is None or alive():
        text = port.read_available()
        if text:
            meter.feed(text)
        tick = ticks_us()
        now += ticks_diff(tick, last)
        last = tick
        if not meter.running:
            started = False
            port.wait(5)
            continue
        if not started:
            due = now
            started = True
        wait = due - now
        if wait > 1500:
            port.wait(wait // 1000 - 1)
            continue
        if wait > 0:
            sleep_us(wait)
            tick = ticks_us()
            now += ticks_diff(tick, last)
            last = tick
        meter.sample(now)
        due += meter.period_us
        behind = now - due
        if behind > meter.period_us:
            skipped = behind // meter.period_us
            due += skipped * meter.period_us
            meter.overruns += skipped
        if meter.overruns and now - reported > 1000000:
            meter.error(E_OVERRUN, "%d sample slots skipped (rate too high?)" % meter.overruns)
            meter.overruns = 0
            reported = now


def board_id():
    """'pico-' and the flash chip's unique id, so each meter names itself."""
    return "pico-" + "".join("%02x" % b for b in machine.unique_id())


def main(bus=None, port=None):
    """Run the firmware on the board (GP4 = SDA, GP5 = SCL on I2C0, 400 kHz)."""
    if bus is None:
        bus = machine.I2C(0, scl=machine.Pin(5), sda=machine.Pin(4), freq=400000)
    if port is None:
        port = UsbSerial()
    meter = Meter(INA219(bus), port.write, meter_id=board_id())
    meter.identify()
    run(meter, port, time.ticks_us, time.ticks_diff, time.sleep_us)


if __name__ == "__main__" and machine is not None:
    main()
