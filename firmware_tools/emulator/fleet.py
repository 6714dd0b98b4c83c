"""The fleet emulator: the meters of many devices in one process, each on its own pty.

    fleet = FleetEmulator(board="pi4", tick_seconds=0.01)
    fleet.add(pid=edge.pid, link="run/.../meter.tty", seed=7, ground_truth="run/ground-truth/device-007.csv")
    fleet.run(spec=Path("run/fleet.jsonl"))      # until stop(); picks up devices appended to the spec file

Every device keeps what a single ``MeterEmulator`` gives it: its own
pseudo-terminal read by the real serial reader on the device side, the real
firmware on an emulated INA219, and power computed from *its own* process's
CPU time (``/proc/PID/task/*/schedstat``) and writes. Only the loop is
shared: one thread ticks every meter in turn and then sleeps until the next
tick or until a host writes a command. One process in place of N saves N-1
interpreters and N-1 schedulers' worth of wake-ups.

The spec file (JSON lines, one device each: ``pid``, ``link``, ``seed``,
optional ``ground_truth``, ``meter_id`` and ``net``) is re-read for appended lines
every tick, so a supervisor can add a device right after starting its
process. A device whose process ended is closed (link removed, log
flushed) and dropped.

Links. A device whose entry has ``net`` (``profile``, ``relay_port``,
``upstream`` as HOST:PORT, and the ``seed`` and ``index`` of its channel
draw) gets the same uplink as under ``qfl meter emulate --net``: its own
``link.Relay`` on ``relay_port`` makes its MQTT bytes pay airtime, and its
meter adds the profile's transmit power while its radio is busy.

Fidelity. A meter is only as good as its tick: if the loop falls behind,
each tick covers a longer interval, the activity of that interval is spread
evenly over its samples, and short phases blur. ``FleetStats`` records the
achieved tick intervals; when their median exceeds ``1.5 x`` the nominal
tick, or the 1-minute load average exceeds the core count, a warning says
the machine is too loaded for millisecond phases to hold. Energy totals
still hold (the CPU time of an interval is never lost, only spread).
"""

from __future__ import annotations

import json
import os
import select
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from firmware_tools.emulator.boards import BoardProfile, get_board
from firmware_tools.emulator.emulator import EmulatorError, MeterEmulator
from firmware_tools.emulator.link import RadioLog, Relay, get_link

SPEC_KEYS = "pid, link, seed, ground_truth, meter_id, net"
WARN_FACTOR = 1.5       # median tick interval over nominal beyond which fidelity is in doubt
WARN_EVERY_SECONDS = 30.0


class SpecError(ValueError):
    """A line of the spec file does not describe a device that can be emulated."""


def spec_entry(line: bytes, where: str) -> dict:
    """The JSON object of one spec line, with an integer ``pid`` and a non-empty ``link``; ``where`` names it."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise SpecError(f"{where} is not JSON ({reason}); each line is one object with {SPEC_KEYS}") from None
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected a JSON object with {SPEC_KEYS}, got {type(entry).__name__}")
    missing = [key for key in ("pid", "link") if key not in entry]
    if missing:
        raise SpecError(f"{where}: missing {' and '.join(map(repr, missing))} (each line needs pid and link)")
    if isinstance(entry["pid"], bool) or not isinstance(entry["pid"], int) or entry["pid"] < 1:
        raise SpecError(f"{where}: pid must be a process id (a positive integer), got {entry['pid']!r}")
    if not isinstance(entry["link"], str) or not entry["link"]:
        raise SpecError(f"{where}: link must be a non-empty path, got {entry['link']!r}")
    return entry


@dataclass
class FleetStats:
    """What the fleet loop achieved (written as JSON by ``qfl meter fleet --stats``)."""

    tick_seconds: float
    devices_max: int = 0
    devices_added: int = 0
    ticks: int = 0
    samples: int = 0
    skipped_samples: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    interval_p50_ms: float = 0.0
    interval_p95_ms: float = 0.0
    interval_max_ms: float = 0.0
    late_ticks: int = 0
    loadavg_max: float = 0.0
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """JSON-safe dict, with the loop's share of one core."""
        doc = asdict(self)
        doc["cpu_share"] = self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        return doc


class FleetEmulator:
    """Many meter emulators driven by one loop (see the module docstring)."""

    def __init__(self, *, board: str | BoardProfile = "pi4", rate_hz: int = 1000, tick_seconds: float = 0.01,
                 boards_file: str | Path | None = None, links_file: str | Path | None = None,
                 log: Callable[[str], None] | None = None):
        self.board = board if isinstance(board, BoardProfile) else get_board(board, boards_file)
        self.rate_hz = rate_hz
        self.tick_seconds = tick_seconds
        self.links_file = links_file
        self.meters: list[MeterEmulator] = []
        self.relays: dict[int, Relay] = {}  # id(meter) -> the relay of its uplink
        self.stats = FleetStats(tick_seconds=tick_seconds)
        self._log = log or (lambda message: None)
        self._stop = False
        self._spec_offset = 0
        self._spec_line = 0
        self._intervals: list[float] = []
        self._last_warning = -1e9

    def add(self, *, pid: int, link: str | Path, seed: int = 0, ground_truth: str | Path | None = None,
            meter_id: str | None = None, net: dict | None = None) -> MeterEmulator:
        """Start emulating the meter of process ``pid`` on a new pty at ``link`` (and its uplink, given ``net``)."""
        radio, relay, radio_power_w = None, None, 0.0
        if net is not None:
            profile = get_link(str(net["profile"]), self.links_file).for_device(
                seed=int(net.get("seed", 0)), index=int(net.get("index", 0)))
            if profile.emulated:
                host, _, port = str(net["upstream"]).rpartition(":")
                radio, radio_power_w = RadioLog(), profile.tx_power_w
                relay = Relay(profile, radio, listen_port=int(net["relay_port"]), upstream=(host, int(port)))
        meter = MeterEmulator(pid=pid, link=link, board=self.board, seed=seed, rate_hz=self.rate_hz,
                              ground_truth=ground_truth, tick_seconds=self.tick_seconds, meter_id=meter_id,
                              log=lambda message, pid=pid: self._log(f"[{pid}] {message}"),
                              radio=radio, radio_power_w=radio_power_w)
        try:
            meter.open()
        except BaseException:
            if relay is not None:
                relay.stop()
            raise
        if relay is not None:
            self.relays[id(meter)] = relay.start()
        self.meters.append(meter)
        self.stats.devices_added += 1
        self.stats.devices_max = max(self.stats.devices_max, len(self.meters))
        return meter

    def stop(self) -> None:
        """End the loop after the current tick (safe from a signal handler)."""
        self._stop = True

    def run(self, spec: Path | None = None, *, until: Callable[[], bool] | None = None) -> FleetStats:
        """Tick every meter until ``stop()`` (or ``until()`` is true); close them all; return the stats."""
        started, cpu0 = time.monotonic(), time.process_time()
        previous = started
        try:
            while not self._stop and not (until is not None and until()):
                began = time.monotonic()
                self._intervals.append(began - previous)
                previous = began
                if spec is not None:
                    self._read_spec(spec)
                for meter in list(self.meters):
                    if not meter.tick(time.monotonic()):
                        self._log(f"[{meter.pid}] {meter.exit_reason}")
                        self._drop(meter)
                self.stats.ticks += 1
                self._check_load(began)
                self._wait(self.tick_seconds - (time.monotonic() - began))
        finally:
            for meter in list(self.meters):
                self._drop(meter)
            self.stats.wall_seconds = time.monotonic() - started
            self.stats.cpu_seconds = time.process_time() - cpu0
            self._summarize_intervals()
        return self.stats

    def _drop(self, meter: MeterEmulator) -> None:
        meter.close()
        relay = self.relays.pop(id(meter), None)
        if relay is not None:
            relay.stop()
            self._log(f"[{meter.pid}] radio on air {relay.radio.busy_seconds:.3f} s for {relay.radio.bytes_sent} bytes")
        self.stats.samples += meter.stats.samples
        self.stats.skipped_samples += meter.stats.skipped_samples
        self.meters.remove(meter)

    def _read_spec(self, spec: Path) -> None:
        try:
            with open(spec, "rb") as fh:
                fh.seek(self._spec_offset)
                data = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SpecError(f"cannot read {spec}: {exc.strerror or exc}") from None
        end = data.rfind(b"\n") + 1  # only whole lines: the writer may be half-way through one
        for line in data[:end].splitlines():
            self._spec_line += 1
            if line.strip():
                self._add_from_spec(spec, self._spec_line, line)
        self._spec_offset += end

    def _add_from_spec(self, spec: Path, number: int, line: bytes) -> None:
        """Start the meter one spec line describes; :class:`SpecError` names the file and line if it cannot."""
        where = f"{spec} line {number}"
        entry = spec_entry(line, where)
        try:
            self.add(pid=entry["pid"], link=entry["link"], seed=int(entry.get("seed", 0)),
                     ground_truth=entry.get("ground_truth"), meter_id=entry.get("meter_id"),
                     net=entry.get("net"))
        except ProcessLookupError as exc:  # it ended before we got to it
            self._log(f"not emulating {entry['link']}: {exc}")
        except KeyError as exc:
            raise SpecError(f"{where}: 'net' needs {exc}") from None
        except OSError as exc:
            reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
            raise SpecError(f"{where}: {reason}") from None
        except (ValueError, TypeError, EmulatorError) as exc:
            raise SpecError(f"{where}: {exc}") from None

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when any host sends a command."""
        if seconds <= 0:
            return
        fds = [m.link._master for m in self.meters if m.link is not None and m.link.plugged]
        try:
            select.select(fds, [], [], seconds)
        except (OSError, ValueError):
            time.sleep(seconds)

    def _check_load(self, now: float) -> None:
        # Judge from the last 200 ticks, or as few as 20: a starved loop makes few ticks.
        if now - self._last_warning < WARN_EVERY_SECONDS or len(self._intervals) < 20:
            return
        recent = np.asarray(self._intervals[-200:])
        median = float(np.median(recent))
        load = os.getloadavg()[0]
        self.stats.loadavg_max = max(self.stats.loadavg_max, load)
        reasons = []
        if median > WARN_FACTOR * self.tick_seconds:
            reasons.append(f"meters tick every {median * 1000:.1f} ms instead of {self.tick_seconds * 1000:.1f} ms")
        if load > self.stats.cores:
            reasons.append(f"load average {load:.1f} on {self.stats.cores} cores")
        if reasons:
            message = (f"machine too loaded for {len(self.meters)} meters ({'; '.join(reasons)}): phase energies "
                       "shorter than a few ticks blur; totals still hold")
            self.stats.warnings.append(message)
            self._log(message)
            self._last_warning = now

    def _summarize_intervals(self) -> None:
        intervals = np.asarray(self._intervals[1:]) * 1000.0
        if intervals.size:
            self.stats.interval_p50_ms = float(np.percentile(intervals, 50))
            self.stats.interval_p95_ms = float(np.percentile(intervals, 95))
            self.stats.interval_max_ms = float(intervals.max())
            self.stats.late_ticks = int((intervals > WARN_FACTOR * self.tick_seconds * 1000.0).sum())
        self.stats.loadavg_max = max(self.stats.loadavg_max, os.getloadavg()[0])
