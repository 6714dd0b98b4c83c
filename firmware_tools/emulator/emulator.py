"""The meter emulator: the real firmware on an emulated INA219, driven by a watched process's activity.

    emulator = MeterEmulator(pid=child.pid, board="pi4", link="/tmp/qfl-meter0", seed=0)
    emulator.start()                        # background thread; the link exists when this returns
    meter = PowerMeter("/tmp/qfl-meter0")   # the reader cannot tell it from a Pico
    ...
    emulator.stop()

``qfl meter emulate`` runs ``MeterEmulator.run()`` in the foreground.

Every tick (10 ms by default) the emulator reads the watched process's CPU
time and bytes written (``procwatch``), turns the activity since the last
tick into board power with the board profile (``boards``), adds seeded
noise, finds the current and the load voltage the supply delivers, applies
them to the emulated chip (``firmware_tools.ina219_model``) and lets the
firmware (``firmware_tools/meter_firmware/main.py``, the file that runs on
the Pico) take every sample that fell due, stamped with the meter's clock.
Commands from the host go to the same firmware object, so the emulator
answers exactly as the firmware does. Output leaves in one write per tick.

The meter clock starts at 0 when the (emulated) meter boots and runs
``1 + drift_ppm * 1e-6`` times as fast as the host's monotonic clock.
Unplugging closes the pty and removes the link; plugging back makes a new
pty and a freshly booted meter (sequence and clock from 0), as a real
USB-powered Pico would. The ground-truth log records the true power of every
scheduled sample, also while the meter is unplugged or stopped.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from firmware_tools.emulator.boards import BoardProfile, get_board
from firmware_tools.emulator.faults import FaultPlan, LineFaults
from firmware_tools.emulator.link import RadioLog
from firmware_tools.emulator.procwatch import ProcessWatcher
from firmware_tools.emulator.ptylink import PtyLink
from firmware_tools.emulator.truth import GroundTruthLog
from firmware_tools.ina219_model import EmulatedI2C, EmulatedINA219
from firmware_tools.meter_firmware.ina219 import INA219
from firmware_tools.meter_firmware.main import MAX_RATE_HZ, Meter

_MAX_CATCH_UP_SECONDS = 2.0  # after a longer stall of the emulator itself, skip rather than flood


class EmulatorError(RuntimeError):
    """The emulator cannot start as configured."""


@dataclass
class EmulatorStats:
    """What the emulator did so far."""

    samples: int = 0
    dropped_lines: int = 0
    corrupted_lines: int = 0
    overflow_samples: int = 0
    unplugs: int = 0
    dropped_bytes: int = 0
    skipped_samples: int = 0


class MeterEmulator:
    """An emulated qfl meter on a pseudo-terminal (see the module docstring).

    Args:
        pid: process whose CPU time and writes drive the emulated power.
        link: path of the symlink to create (e.g. ``/tmp/qfl-meter0``).
        board: profile name in ``boards.toml`` (pi-zero-2w, pi4, pi5) or a BoardProfile.
        seed: seeds the power noise and the fault injection.
        rate_hz: the highest rate the emulated meter accepts (a higher START is lowered to it).
        ground_truth: CSV path for the true power log, or None.
        faults: which faults to inject.
        tick_seconds: how often /proc is read and output is written.
        meter_id: name in the identification line (default ``emu-<board>-<pid>``).
        log: called with one-line notices (unplug, replug, unreadable /proc/PID/io).
        radio: busy intervals of the emulated uplink radio (``link.RadioLog``, filled by the relay); while
            it transmits the board draws ``radio_power_w`` more, and the board's per-byte radio term is
            left out (the link, not the write counter, is then the radio).
    """

    def __init__(self, *, pid: int, link: str | Path, board: str | BoardProfile = "pi4", seed: int = 0,
                 rate_hz: int = 1000, ground_truth: str | Path | None = None, faults: FaultPlan | None = None,
                 tick_seconds: float = 0.01, meter_id: str | None = None, boards_file: str | Path | None = None,
                 log: Callable[[str], None] | None = None, radio: RadioLog | None = None,
                 radio_power_w: float = 0.0):
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, int) or not 1 <= rate_hz <= MAX_RATE_HZ:
            raise EmulatorError(f"rate_hz must be an integer 1..{MAX_RATE_HZ}, got {rate_hz!r}")
        if not 0.001 <= tick_seconds <= 0.5:
            raise EmulatorError(f"tick_seconds must be within 0.001..0.5, got {tick_seconds!r}")
        self.board = board if isinstance(board, BoardProfile) else get_board(board, boards_file)
        self.pid = pid
        self.link_path = Path(link)
        self.rate_hz = rate_hz
        self.ground_truth = Path(ground_truth) if ground_truth is not None else None
        self.faults = faults or FaultPlan()
        self.tick_seconds = tick_seconds
        self.meter_id = meter_id or f"emu-{self.board.name}-{pid}"
        self.stats = EmulatorStats()
        self.radio, self.radio_power_w = radio, float(radio_power_w)
        self.exit_reason: str | None = None
        self._log = log or (lambda message: None)
        self._watcher = ProcessWatcher(pid)  # fails now, clearly, if the process does not exist
        if self._watcher.io_problem:
            self._log(self._watcher.io_problem)
        noise_seed, fault_seed = np.random.SeedSequence(seed).spawn(2)
        self._noise = np.random.default_rng(noise_seed)
        self._line_faults = LineFaults(self.faults, np.random.default_rng(fault_seed))
        self._speed = 1.0 + self.faults.drift_ppm * 1e-6
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._out: list[str] = []
        self.link: PtyLink | None = None
        self.firmware: Meter | None = None
        self._chip: EmulatedINA219 | None = None
        self._t0: float | None = None

    # --- running ---------------------------------------------------------------------------------
    def start(self) -> MeterEmulator:
        """Run in a background thread; returns once the link exists (raises if it could not be made)."""
        if self._thread is not None:
            raise EmulatorError("this emulator was already started")
        self._thread = threading.Thread(target=self._run_in_thread, name=f"MeterEmulator({self.link_path})",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler) and wait for a background thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    @property
    def started_at(self) -> float | None:
        """Host monotonic time the loop started: fault windows count from here."""
        return self._t0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> MeterEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def run(self) -> int:
        """The emulator loop, in the calling thread, until ``stop()`` or the watched process ends."""
        self.open()
        try:
            self._ready.set()
            while not self._stop.is_set():
                began = time.monotonic()
                if not self.tick(began):
                    break
                self.link.wait((self.tick_seconds - (time.monotonic() - began)) * 1000.0)
            else:
                self.exit_reason = "stopped"
        finally:
            self.close()
            self._ready.set()
        return 0

    def open(self) -> None:
        """Create the link and the ground-truth log and boot the meter (for a caller that drives ``tick``)."""
        self.link = PtyLink(self.link_path)
        try:
            self._truth = GroundTruthLog(self.ground_truth) if self.ground_truth is not None else None
        except BaseException:
            self.link.close()
            raise
        self._t0 = time.monotonic()
        first = self._watcher.sample()
        self._prev_host, self._prev_cpu, self._prev_written = self._t0, first.cpu_seconds, first.bytes_written
        self._next_host = self._t0
        self._boot(self._t0)

    def tick(self, now: float) -> bool:
        """One tick at host time ``now``; False (and ``exit_reason`` set) once the watched process ended."""
        if self._step(now, self._truth):
            return True
        self.exit_reason = f"watched process {self.pid} ended"
        return False

    def close(self) -> None:
        """Close the pty (removing the link), the ground-truth log and the /proc files; idempotent."""
        if self.link is not None:
            self.link.close()
            self.stats.dropped_bytes = self.link.dropped_bytes
        truth = getattr(self, "_truth", None)
        if truth is not None:
            truth.close()
        self._watcher.close()

    # --- one tick --------------------------------------------------------------------------------
    def _boot(self, now: float) -> None:
        """A fresh meter: chip at power-on, firmware configured for the board, identification sent."""
        self._chip = EmulatedINA219()
        bus = EmulatedI2C({0x40: self._chip})
        self._out.clear()
        self.firmware = Meter(INA219(bus), self._out.append, meter_id=self.meter_id,
                              shunt_milliohm=self.board.shunt_milliohm, config=self.board.meter_config,
                              max_rate_hz=self.rate_hz)
        self.firmware.identify()
        self._boot_host = now
        self._next_us = 0.0
        self._flush()

    def _flush(self) -> None:
        if self._out:
            lines = self._out[:]
            self._out.clear()
            data = self._line_faults.apply(lines)
            self.link.write(data)
            self.stats.dropped_lines = self._line_faults.dropped
            self.stats.corrupted_lines = self._line_faults.corrupted

    def _step(self, now: float, truth: GroundTruthLog | None) -> bool:
        link = self.link
        if link.plugged:
            text = link.read_available()
            if text:
                self.firmware.feed(text)
                self._flush()
        activity = self._watcher.sample()
        if not activity.alive:
            return False
        elapsed = now - self._prev_host
        busy = (activity.cpu_seconds - self._prev_cpu) / elapsed if elapsed > 0 else 0.0
        rate = 0.0
        if activity.bytes_written is not None and self._prev_written is not None and elapsed > 0:
            rate = (activity.bytes_written - self._prev_written) / elapsed
        self._prev_host, self._prev_cpu, self._prev_written = now, activity.cpu_seconds, activity.bytes_written

        since_start = now - self._t0
        unplugged = self.faults.unplugged_at(since_start)
        if unplugged and link.plugged:
            self._flush()
            link.unplug()
            self.stats.unplugs += 1
            self._next_host = self._boot_host + self._next_us / 1e6 / self._speed
            self._log(f"meter unplugged at {since_start:.2f} s")
        elif not unplugged and not link.plugged:
            link.plug()
            self._boot(now)
            self._log(f"meter plugged back at {since_start:.2f} s as {link.device}")

        hosts, meters = self._due(now)
        if len(hosts):
            self._emit(hosts, meters, busy, rate, truth)
        self._flush()
        return True

    def _due(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Host times and meter microseconds (NaN while unplugged) of the samples that fell due."""
        fw = self.firmware
        if self.link.plugged:
            period = fw.period_us if fw.running else 1e6 / self.rate_hz
            meter_now = (now - self._boot_host) * self._speed * 1e6
            count = int((meter_now - self._next_us) // period) + 1 if meter_now >= self._next_us else 0
            cap = int(_MAX_CATCH_UP_SECONDS * 1e6 / period)
            if count > cap:
                self.stats.skipped_samples += count - cap
                self._next_us += (count - cap) * period
                count = cap
            meters = self._next_us + period * np.arange(count)
            self._next_us += count * period
            hosts = self._boot_host + meters / 1e6 / self._speed
            return hosts, meters
        period_s = 1.0 / self.rate_hz
        count = int((now - self._next_host) // period_s) + 1 if now >= self._next_host else 0
        hosts = self._next_host + period_s * np.arange(count)
        self._next_host += count * period_s
        return hosts, np.full(count, math.nan)

    def _emit(self, hosts: np.ndarray, meters: np.ndarray, busy: float, rate: float,
              truth: GroundTruthLog | None) -> None:
        board = self.board
        if self.radio is not None:
            fw = self.firmware
            window = (fw.period_us / 1e6 / self._speed) if fw.running else 1.0 / self.rate_hz
            on_air = self.radio.busy_fraction(hosts - window, hosts)
            power = board.power(busy, 0.0) + self.radio_power_w * on_air
        else:
            power = board.power(busy, rate)
        power = power + self._noise.normal(0.0, board.noise_w, len(hosts))
        current, volts = board.operating_point(power)
        if self.faults.overflow_bursts:
            since = hosts - self._t0
            burst = np.array([self.faults.overflow_at(t) for t in since.tolist()], dtype=bool)
            if burst.any():  # a current beyond the PGA range: the chip saturates and flags OVF
                full_scale = self._chip.configuration.shunt_range_volts
                current[burst] = 1.5 * full_scale / board.shunt_ohms
                volts[burst] = board.supply_v - current[burst] * board.series_ohms
                power[burst] = volts[burst] * current[burst]
                self.stats.overflow_samples += int(burst.sum())
        fw = self.firmware
        if self.link.plugged and fw.running:
            chip = self._chip
            shunt_ohms = board.shunt_ohms
            for t_us, amps, v in zip(meters.tolist(), current.tolist(), volts.tolist()):
                chip.set_inputs(amps * shunt_ohms, v)
                fw.sample(int(t_us))
            self.stats.samples += len(hosts)
        if truth is not None:
            truth.write(hosts, meters / 1e6, power, current, volts)
