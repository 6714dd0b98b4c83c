"""PowerMeter: read a qfl meter over a serial port in a background thread.

Usable in three lines::

    meter = PowerMeter("/dev/ttyACM0")          # opens, identifies, starts, measures idle power
    with meter.phase("train"):
        train()
    print(meter.phase_energy("train").joules)
    meter.close()

The thread owns the port. It survives the port vanishing (USB unplugged, the
emulator's pseudo-terminal removed): the run of samples breaks, every open
phase gets a gap, and the port is reopened with exponential backoff; after a
reconnection the meter is identified and started again. Garbage and CRC-bad
lines are dropped and counted. All the decoding, clock alignment and energy
arithmetic happens in the pure ``edge.meter.stream.MeterStream``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Callable

import serial

from edge.meter.errors import MeterClosed, MeterError, MeterTimeout, ProtocolError, UnknownPhase
from edge.meter.ina219 import calibration_register
from edge.meter.integrate import PhaseEnergy, PhaseToken
from edge.meter.protocol import MAX_RATE_HZ, Ack, Identity, command
from edge.meter.stream import MeterCounters, MeterStream, Reading

log = logging.getLogger(__name__)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 1.0


class Phase:
    """A named stretch of time whose energy is integrated; use as a context manager.

        with meter.phase("uplink") as p:
            publish()
        p.energy().joules
    """

    def __init__(self, meter: PowerMeter, name: str):
        self.meter = meter
        self.name = name
        self._token: PhaseToken | None = None

    def begin(self, at: float | None = None) -> Phase:
        """Start now, or at host monotonic time ``at`` (at most a couple of seconds in the past)."""
        if self._token is not None:
            raise MeterError(f"phase {self.name!r} was already started")
        self._token = self.meter._open_phase(self.name, time.monotonic() if at is None else at)
        return self

    def end(self, at: float | None = None) -> None:
        """End now, or at host monotonic time ``at``."""
        if self._token is None:
            raise MeterError(f"phase {self.name!r} was never started")
        self.meter._close_phase(self._token, time.monotonic() if at is None else at)

    def energy(self, timeout: float = 1.0) -> PhaseEnergy:
        """The phase's energy, waiting up to ``timeout`` s for the samples that cover its end."""
        if self._token is None:
            raise MeterError(f"phase {self.name!r} was never started")
        return self.meter._settle(self._token, timeout)

    def __enter__(self) -> Phase:
        return self.begin()

    def __exit__(self, *exc_info: object) -> None:
        self.end()

    def __repr__(self) -> str:
        return f"<Phase {self.name!r} {self._token!r}>"


class PowerMeter:
    """A qfl power meter (docs/meter-protocol.md) on a serial port.

    Opening connects, asks the meter to identify itself (``ID?``), optionally
    sends a calibration (``CAL``) and configuration (``CFG``), starts sampling
    at ``rate_hz`` and, if ``idle_seconds > 0``, measures the idle power that
    ``joules_above_idle`` subtracts. Raises MeterError if the port cannot be
    opened and MeterTimeout if nothing identifies itself within ``timeout``.

    Args:
        port: serial device, e.g. ``/dev/ttyACM0`` or the emulator's link path.
        rate_hz: samples per second asked of the meter (1..5000).
        idle_seconds: length of the idle baseline measured at start (0 to skip).
        timeout: seconds to wait for each answer of the meter.
        shunt_ohms, current_lsb_amps: if given, sent with ``CAL`` (the other
            defaults to what the meter reports, or 100 uA for the LSB).
        config: INA219 configuration register to send with ``CFG``.
        max_bridge_samples: up to this many lost lines in a row are bridged
            by the trapezoid; longer holes are gaps.
        gain_tolerance: sensor gain error added to each phase's uncertainty
            (INA219B datasheet: 0.5 % max; set 0 to report integration only).
        stall_seconds: no sample for this long restarts the meter.
        baudrate: ignored by USB CDC and ptys; kept for UART bridges.
        poll_interval: after a small read the thread waits this long, so lines
            are handled in batches (fewer wake-ups, less CPU).

    Beyond phases: ``idle_watts``, ``measure_idle()``, ``live()`` (mean V, A,
    W since the last call), ``counters``, ``identity``, ``state``, ``drift_ppm``,
    ``drift_uncertainty_ppm``.
    """

    def __init__(self, port: str, *, rate_hz: int = 1000, idle_seconds: float = 1.0, timeout: float = 5.0,
                 shunt_ohms: float | None = None, current_lsb_amps: float | None = None, config: int | None = None,
                 max_bridge_samples: int = 4, gain_tolerance: float = 0.005, stall_seconds: float = 1.0,
                 baudrate: int = 115200, poll_interval: float = 0.005):
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, int) or not 1 <= rate_hz <= MAX_RATE_HZ:
            raise MeterError(f"rate_hz must be an integer 1..{MAX_RATE_HZ}, got {rate_hz!r}")
        if idle_seconds < 0 or not timeout > 0 or not stall_seconds > 0:
            raise MeterError(f"need idle_seconds >= 0, timeout > 0 and stall_seconds > 0; "
                             f"got {idle_seconds!r}, {timeout!r}, {stall_seconds!r}")
        if config is not None and not 0 <= config <= 0xFFFF:
            raise MeterError(f"config must be a 16-bit INA219 configuration value, got {config!r}")
        if shunt_ohms is not None and current_lsb_amps is not None:
            calibration_register(shunt_ohms, current_lsb_amps)  # raises ConversionError if it cannot fit
        self.port = port
        self.rate_hz = rate_hz
        self.timeout = timeout
        self.idle_watts = 0.0
        self._calibration = (shunt_ohms, current_lsb_amps) if (shunt_ohms or current_lsb_amps) else None
        self._config = config
        self._stall_seconds = stall_seconds
        self._baudrate = baudrate
        self._poll_interval = poll_interval
        self._stream = MeterStream(rate_hz=rate_hz, max_bridge_samples=max_bridge_samples,
                                   gain_tolerance=gain_tolerance)
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._state = "connecting"
        self._last_phase: dict[str, PhaseToken] = {}
        self._closed = False
        ser = self._open_port()
        self._thread = threading.Thread(target=self._run, args=(ser,), name=f"PowerMeter({port})", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self.close()
            raise self._startup_error
        if idle_seconds > 0:
            try:
                self.measure_idle(idle_seconds)
            except BaseException:
                self.close()
                raise

    # --- public API ------------------------------------------------------------------------------
    def phase(self, name: str) -> Phase:
        """A phase named ``name``; ``with meter.phase("train"): ...`` integrates the block."""
        if not isinstance(name, str) or not name:
            raise MeterError(f"a phase name is a non-empty string, got {name!r}")
        return Phase(self, name)

    def phase_energy(self, name: str, timeout: float = 1.0) -> PhaseEnergy:
        """Energy of the last completed phase called ``name`` (waits up to ``timeout`` s for its last samples)."""
        with self._cond:
            token = self._last_phase.get(name)
        if token is None:
            raise UnknownPhase(f"no completed phase named {name!r}; completed: {sorted(self._last_phase) or 'none'}")
        return self._settle(token, timeout)

    def measure_idle(self, seconds: float = 1.0) -> float:
        """Measure the idle baseline over ``seconds`` (keep the device idle meanwhile); returns watts."""
        with self.phase("idle"):
            self._closing.wait(seconds)
        energy = self.phase_energy("idle", timeout=max(1.0, self.timeout))
        if energy.covered_seconds <= 0:
            raise MeterError(f"no samples from {self.port} during the {seconds} s idle measurement")
        self.idle_watts = energy.mean_watts
        with self._cond:
            self._stream.set_idle_watts(self.idle_watts)
        return self.idle_watts

    def live(self) -> Reading | None:
        """Mean volts, amps and watts of the samples since the previous call (None if none arrived)."""
        with self._cond:
            return self._stream.take_reading()

    @property
    def counters(self) -> MeterCounters:
        """A copy of the link counters: samples, CRC errors, lost samples, reconnects, ..."""
        with self._cond:
            return replace(self._stream.counters)

    @property
    def identity(self) -> Identity | None:
        """What the meter said about itself (``#QFLM`` line)."""
        return self._stream.identity

    @property
    def state(self) -> str:
        """``connecting``, ``streaming``, ``reconnecting`` or ``closed``."""
        return self._state

    @property
    def drift_ppm(self) -> float:
        """Fitted meter clock drift against the host clock."""
        with self._cond:
            return self._stream.clock.drift_ppm

    @property
    def drift_uncertainty_ppm(self) -> float | None:
        """How far off :attr:`drift_ppm` may be (None until the clock fit has a slope)."""
        with self._cond:
            return self._stream.clock.drift_uncertainty_ppm

    def close(self) -> None:
        """Stop the meter and release the port; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._state = "closed"
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> PowerMeter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        meter = self._stream.identity.meter_id if self._stream.identity else "?"
        return (f"<PowerMeter port={self.port!r} state={self._state} meter={meter!r} rate={self.rate_hz} Hz "
                f"samples={self._stream.counters.samples}>")

    # --- phases (called by Phase) ----------------------------------------------------------------
    def _open_phase(self, name: str, start: float) -> PhaseToken:
        if self._closed:
            raise MeterClosed(f"meter on {self.port} is closed")
        with self._cond:
            return self._stream.open_phase(name, start)

    def _close_phase(self, token: PhaseToken, end: float) -> None:
        with self._cond:
            try:
                self._stream.close_phase(token, end)
            except ValueError as exc:
                raise MeterError(str(exc)) from None
            self._last_phase[token.name] = token
            self._cond.notify_all()

    def _settle(self, token: PhaseToken, timeout: float) -> PhaseEnergy:
        if token.end == float("inf"):
            raise MeterError(f"phase {token.name!r} is still running; end it before asking for its energy")
        deadline = time.monotonic() + timeout
        with self._cond:
            while token.result is None and self._state == "streaming":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._stream.settle(token)

    # --- the thread ------------------------------------------------------------------------------
    def _open_port(self) -> serial.Serial:
        try:
            return serial.Serial(self.port, self._baudrate, timeout=0.1, write_timeout=1.0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise MeterError(f"cannot open meter port {self.port!r}: {exc}. Is the meter plugged in "
                             "(ls /dev/ttyACM*), is the emulator running, and may this user open it "
                             "(group dialout)?") from None

    def _run(self, ser: serial.Serial | None) -> None:
        backoff = _BACKOFF_START
        streaming = False
        down_since: float | None = None
        try:
            while not self._closing.is_set():
                try:
                    if ser is None:
                        ser = self._open_port()
                    if not streaming:
                        self._handshake(ser)
                        streaming = True
                        backoff = _BACKOFF_START
                        self._set_state("streaming")
                        if down_since is not None:
                            log.warning("meter %s: streaming again after %.2f s", self.port, time.monotonic() - down_since)
                            down_since = None
                        self._ready.set()
                    streaming = self._pump(ser)
                except (serial.SerialException, OSError, MeterError) as exc:
                    if not self._ready.is_set():  # the first connection failed: the constructor raises it
                        self._startup_error = exc if isinstance(exc, MeterError) else MeterError(
                            f"meter on {self.port}: {exc}")
                        self._ready.set()
                        return
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning("meter %s: %s; reconnecting", self.port, exc)
                    else:
                        log.debug("meter %s: %s; next try in %.2f s", self.port, exc, backoff)
                    ser = self._drop(ser)
                    streaming = False
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                except Exception as exc:  # a bug must not kill the reader of a long run; keep going
                    log.exception("meter %s: unexpected error: %s", self.port, exc)
                    ser = self._drop(ser)
                    streaming = False
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            if ser is not None:
                with contextlib.suppress(serial.SerialException, OSError):
                    ser.write(command("STOP"))
                ser.close()
            self._ready.set()
            self._set_state("closed")

    def _pump(self, ser: serial.Serial) -> bool:
        """Read what arrived and feed it to the stream; False when the meter must be started again."""
        began = time.monotonic()
        data = ser.read(ser.in_waiting or 1)
        if data:
            waiting = ser.in_waiting
            if waiting:
                data += ser.read(waiting)
        now = time.monotonic()
        with self._cond:
            if data:
                self._stream.feed(data, now)
                self._cond.notify_all()
            if self._stream.needs_start:
                self._stream.needs_start = False
                return False
            last = self._stream.last_sample_host
            if last is not None and now - last > self._stall_seconds:
                self._stream.counters.stalls += 1
                self._stream.last_sample_host = now
                log.warning("meter %s: no samples for %.1f s; restarting it", self.port, self._stall_seconds)
                return False
        if len(data) < 4096:  # a trickle: let a few milliseconds of lines pile up before the next read
            pause = self._poll_interval - (time.monotonic() - began)
            if pause > 0:
                time.sleep(pause)
        return True

    def _drop(self, ser: serial.Serial | None) -> None:
        """Forget a port that failed: the stream breaks its run and the state says so."""
        if ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()
        with self._cond:
            if self._state == "streaming":  # count each outage once, not each failed attempt
                self._stream.disconnected()
            self._state = "reconnecting"
            self._cond.notify_all()
        return None

    def _set_state(self, state: str) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def _handshake(self, ser: serial.Serial) -> None:
        """Identify the meter, send calibration and configuration if asked, and start it."""
        ser.reset_input_buffer()
        stream = self._stream
        self._ask_identity(ser, stop_first=True)
        if self._calibration is not None or self._config is not None:
            if self._calibration is not None:
                ident = stream.identity
                shunt, lsb = self._calibration
                shunt = shunt if shunt is not None else ident.shunt_ohms
                lsb = lsb if lsb is not None else 100e-6
                self._command(ser, command("CAL", shunt * 1e3, lsb * 1e6), "CAL")
            if self._config is not None:
                self._command(ser, command("CFG", f"{self._config:04X}"), "CFG")
            self._ask_identity(ser, stop_first=False)
        with self._cond:
            stream.set_rate(self.rate_hz)
            stream.last_sample_host = time.monotonic()
        samples = stream.counters.samples
        rate = self._acked_rate(self._command(ser, command("START", self.rate_hz), "START"))
        if rate != self.rate_hz:
            with self._cond:
                stream.set_rate(rate)
        # Return only once samples flow, so a phase begun right after opening starts inside the data.
        self._await(ser, lambda: stream.counters.samples > samples, "send samples after START")

    def _unusable_lines(self, before: MeterCounters) -> str:
        """Why lines that came while waiting did not count, e.g. ' (120 lines came: 120 malformed, 0 CRC errors)'."""
        with self._cond:
            now = self._stream.counters
            lines = now.lines - before.lines
            malformed, crc = now.malformed_lines - before.malformed_lines, now.crc_errors - before.crc_errors
        if not malformed and not crc:
            return ""
        return f" ({lines} lines came: {malformed} malformed, {crc} CRC errors)"

    def _acked_rate(self, ack: Ack) -> int:
        """The rate in ``OK,START,<hz>``; a meter that reports no usable rate is at fault (ProtocolError)."""
        text = ack.values[0] if ack.values else ""
        if not (text.isdigit() and 1 <= int(text) <= MAX_RATE_HZ):
            raise ProtocolError("format", f"meter on {self.port} acknowledged START with rate {text!r}; "
                                          f"expected the rate it set, an integer 1..{MAX_RATE_HZ}")
        return int(text)

    def _ask_identity(self, ser: serial.Serial, *, stop_first: bool) -> None:
        with self._cond:
            self._stream.expect_identity()
            seen = self._stream.identities_seen
        ser.write((command("STOP") if stop_first else b"") + command("ID?"))

        def identified() -> bool:
            refused = self._stream.identity_error
            if refused is not None:  # the meter answered, but with an identity that cannot be used
                raise ProtocolError(refused.reason, f"meter on {self.port}: {refused}")
            return self._stream.identities_seen > seen

        self._await(ser, identified, "identify itself (ID?)")

    def _command(self, ser: serial.Serial, line: bytes, name: str) -> Ack:
        """Send one command and wait for its ``OK``; a meter error line in between is raised."""
        with self._cond:
            acks, faults = self._stream.ack_count, self._stream.counters.meter_errors
        ser.write(line)

        def answered() -> bool:
            stream = self._stream
            if stream.counters.meter_errors > faults:
                fault = stream.faults[-1]
                raise MeterError(f"meter rejected {line.decode().strip()!r}: E{fault.code} {fault.text}")
            return any(a.command == name for a in list(stream.acks)[-(stream.ack_count - acks):]) \
                if stream.ack_count > acks else False

        self._await(ser, answered, f"acknowledge {name}")
        return next(a for a in reversed(self._stream.acks) if a.command == name)

    def _await(self, ser: serial.Serial, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            before = replace(self._stream.counters)
        while True:
            with self._cond:
                if done():
                    return
            if self._closing.is_set():
                raise MeterError(f"meter on {self.port} closed while waiting for it to {what}")
            if time.monotonic() > deadline:
                raise MeterTimeout(f"meter on {self.port} did not {what} within {self.timeout} s"
                                   f"{self._unusable_lines(before)}; "
                                   "is it running the qfl meter firmware (or the emulator)?")
            data = ser.read(ser.in_waiting or 1)
            if data:
                with self._cond:
                    self._stream.feed(data, time.monotonic())
