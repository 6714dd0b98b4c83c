"""The meter firmware run under CPython: its real loop on a real pty, against the emulated INA219."""

from __future__ import annotations

import ast
import os
import threading
import time
from pathlib import Path

import pytest

from edge.meter import PowerMeter
from edge.meter.protocol import Ack, Identity, MeterFault, Sample, command, parse_line
from firmware_tools import flash
from firmware_tools.emulator.ptylink import PtyLink
from firmware_tools.ina219_model import EmulatedI2C, EmulatedINA219
from firmware_tools.meter_firmware import main as firmware
from firmware_tools.meter_firmware.ina219 import INA219

FIRMWARE_FILES = [Path(firmware.__file__), Path(firmware.__file__).with_name("ina219.py")]


class Board:
    """The firmware's own ``run()`` loop in a thread, on a pty, with an emulated chip: a Pico without the Pico."""

    def __init__(self, path: Path, *, devices: dict | None = None, sleep_extra: float = 0.0):
        self.chip = EmulatedINA219()
        bus = EmulatedI2C({0x40: self.chip} if devices is None else devices)
        self.link = PtyLink(path)
        self.meter = firmware.Meter(INA219(bus), self.link.write, meter_id="cpython-board")
        self.meter.identify()
        self._stop = threading.Event()
        self._sleep_extra = sleep_extra
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        firmware.run(self.meter, self.link, lambda: time.monotonic_ns() // 1000, lambda a, b: a - b,
                     lambda us: time.sleep(us / 1e6 + self._sleep_extra), alive=lambda: not self._stop.is_set())

    def __enter__(self) -> Board:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.link.close()


def _exchange(path: Path, lines: list[bytes], replies: int, seconds: float = 3.0) -> list:
    """Send command lines on the host side of the pty, collect the non-sample replies."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    got: list = []
    buffer = b""
    try:
        for line in lines:
            os.write(fd, line)
            time.sleep(0.02)
        deadline = time.monotonic() + seconds
        while len(got) < replies and time.monotonic() < deadline:
            try:
                buffer += os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.01)
            *complete, buffer = buffer.split(b"\n")
            got += [parse_line(x) for x in complete if x and not x.startswith(b"S,")]
    finally:
        os.close(fd)
    return got


def test_the_reader_accepts_the_firmware_stream(tmp_path):
    path = tmp_path / "pico"
    with Board(path) as board:
        board.chip.set_inputs(shunt_volts=0.06, bus_volts=5.0)  # 0.6 A at 5 V: 3 W
        with PowerMeter(str(path), idle_seconds=0, rate_hz=500) as meter:
            assert meter.identity.meter_id == "cpython-board" and meter.identity.calibration == 4096
            with meter.phase("steady"):
                time.sleep(0.6)
            energy = meter.phase_energy("steady")
            counters = meter.counters
    assert energy.mean_watts == pytest.approx(3.0, rel=1e-3)
    assert counters.crc_errors == 0 and counters.malformed_lines == 0 and counters.lost_samples == 0
    # A Python thread is no real-time loop: on a busy machine it skips slots (reported as E,6),
    # which leaves gaps; most of the phase is still covered.
    assert 150 <= energy.samples <= 310 and energy.gap_seconds < 0.3


def test_the_firmware_answers_every_command(tmp_path):
    path = tmp_path / "pico"
    with Board(path):
        replies = _exchange(path, [
            b"ID?\n", command("START", 250), command("STOP"), b"cal 50 200\r", command("CFG", "199F"),
            b"CFG 8000\n", b"START 1000*00\n", b"JUMP\n", b"START 0\n", b"CAL 1 0.001\n", b"CFG XYZ\n",
            b"X" * 100 + b"\n", b"STOP\n",
        ], replies=14)
    expected = [
        Identity(1, "cpython-board", firmware.FIRMWARE, 100.0, 0x399F, 4096),  # boot banner
        Identity(1, "cpython-board", firmware.FIRMWARE, 100.0, 0x399F, 4096),  # ID?
        Ack("START", ("250",)),
        Ack("STOP", (replies[3].values[0],)),
        Ack("CAL", ("50", "200", "1000")),       # trunc(40960000 / (200 * 50)) = 4096
        Ack("CFG", ("199F",)),
        Ack("CFG", ("399F",)),                   # reset: power-on configuration, calibration written again
    ]
    assert replies[:7] == expected
    assert int(replies[3].values[0]) > 0         # STOP reports how many samples went out
    assert [(r.code if isinstance(r, MeterFault) else r) for r in replies[7:13]] == [3, 1, 2, 2, 2, 5]
    assert replies[13] == Ack("STOP", replies[13].values)


def test_a_missing_chip_is_reported_and_the_firmware_keeps_answering(tmp_path):
    path = tmp_path / "pico"
    with Board(path, devices={}):
        replies = _exchange(path, [b"START 100\n", b"STOP\n", b"ID?\n"], replies=5)
    kinds = [(type(r).__name__, getattr(r, "code", None)) for r in replies]
    assert kinds[0] == ("MeterFault", 4)                         # at boot: INA219 not answering
    assert ("Ack", None) in kinds and ("Identity", None) in kinds  # commands still answered
    assert ("MeterFault", 4) in kinds[2:]                        # and each failed read says so


def test_overruns_are_reported_when_the_board_cannot_keep_up(tmp_path):
    path = tmp_path / "pico"
    with Board(path, sleep_extra=0.004) as board:  # a board that needs 4 ms more per sample than it has
        board.chip.set_inputs(0.01, 5.0)
        replies = _exchange(path, [b"START 1000\n"], replies=3, seconds=3.0)
    assert isinstance(replies[0], Identity) and replies[1] == Ack("START", ("1000",))
    assert isinstance(replies[2], MeterFault) and replies[2].code == 6 and "skipped" in replies[2].text


def test_sample_lines_carry_the_chip_registers_and_a_growing_clock():
    out: list[str] = []
    chip = EmulatedINA219()
    meter = firmware.Meter(INA219(EmulatedI2C({0x40: chip})), out.append)
    for i, volts in enumerate((4.9, 5.0, 5.1)):
        chip.set_inputs(0.02 * (i + 1), volts)
        meter.sample(1000 * (i + 1))
    samples = [parse_line(line.encode()) for line in out]
    assert samples == [Sample(0, 1000, 2000, (1225 << 3) | 2), Sample(1, 2000, 4000, (1250 << 3) | 2),
                       Sample(2, 3000, 6000, (1275 << 3) | 2)]


@pytest.mark.parametrize("path", FIRMWARE_FILES, ids=lambda p: p.name)
def test_firmware_files_stay_in_the_micropython_subset(path):
    """No f-strings, annotations, dataclasses or typing on the board (MicroPython lacks or ignores them)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        assert not isinstance(node, (ast.JoinedStr, ast.AnnAssign, ast.NamedExpr, ast.Match)), \
            f"{path.name}:{node.lineno}: {type(node).__name__} is not for MicroPython"
        if isinstance(node, (ast.FunctionDef, ast.arg)):
            assert getattr(node, "returns", None) is None and getattr(node, "annotation", None) is None, \
                f"{path.name}:{node.lineno}: annotations are not for MicroPython"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not {"dataclasses", "typing", "__future__", "os", "numpy"} & set(names), \
                f"{path.name}:{node.lineno}: imports {names}"


# --- flashing -------------------------------------------------------------------------------------------
def test_flash_steps_copy_the_driver_then_main_then_reset():
    steps = flash.flash_steps("/dev/ttyACM0")
    assert [s[3:] for s in steps] == [["cp", str(flash.FIRMWARE_DIR / "ina219.py"), ":ina219.py"],
                                      ["cp", str(flash.FIRMWARE_DIR / "main.py"), ":main.py"], ["reset"]]
    assert all(s[:3] == ["mpremote", "connect", "/dev/ttyACM0"] for s in steps)
    assert all(Path(s[4]).is_file() for s in steps[:2])


def test_flash_explains_a_missing_board_and_a_missing_mpremote(tmp_path):
    with pytest.raises(flash.FlashError, match="is the Pico plugged in"):
        flash.flash(str(tmp_path / "ttyACM9"))
    master, slave = os.openpty()
    try:
        with pytest.raises(flash.FlashError, match="pip install mpremote"):
            flash.flash(os.ttyname(slave), mpremote="mpremote-that-is-not-installed")
    finally:
        os.close(master)
        os.close(slave)
    assert flash.main(["--port", str(tmp_path / "ttyACM9")]) == 2


@pytest.mark.skipif(flash.find_mpremote() is None, reason="mpremote is not installed")
def test_flash_reports_a_port_without_micropython(tmp_path):
    with PtyLink(tmp_path / "not-a-pico"):  # a serial device where nothing answers the raw REPL
        with pytest.raises(flash.FlashError, match="failed|did not finish"):
            flash.flash(str(tmp_path / "not-a-pico"), timeout=15)
