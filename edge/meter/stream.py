"""From meter bytes to energy: line splitting, parsing, register conversion, clock alignment, phases.

Pure (no serial port, no threads): ``feed(data, host_time)`` takes whatever
bytes arrived and the host time at which they were read. The reader thread in
``edge.meter.reader`` calls it; tests call it directly with synthetic
streams::

    stream = MeterStream(rate_hz=1000)
    stream.feed(identification_line, time.monotonic())
    token = stream.open_phase("train", start)
    stream.feed(more_bytes, time.monotonic())
    stream.close_phase(token, end)
    energy = stream.settle(token)

Samples are converted on the host: I = V_shunt / R_shunt (the same value the
chip's current register gives, without the truncation of the calibration
register), V = bus volts, P = V * I. A sample is invalid (counted in
``overflow_samples`` and never integrated) when the chip sets OVF or the
shunt reading sits at the full scale of its PGA range (the true current may
be larger). Consecutive valid samples at most ``max_bridge_samples + 1``
periods apart are integrated, bridging lost lines; anything longer is a gap.
The first ``warmup_seconds`` of samples of a run (after start, reconnection
or a meter restart) are held back until the clock fit has a bucket of
minimum-delay points, so the run is placed on the host clock by a good fit
rather than by the delay of its very first line.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from edge.meter.clock import ClockAligner
from edge.meter.errors import ProtocolError
from edge.meter.ina219 import BUS_LSB_VOLTS, SHUNT_LSB_VOLTS, decode_config
from edge.meter.integrate import EnergyIntegrator, PhaseEnergy, PhaseToken
from edge.meter.protocol import MAX_COUNTER, MAX_RATE_HZ, Ack, Identity, LineSplitter, MeterFault, Sample, parse_line

# A seq jump may exceed the sample slots the meter clock allows by this much: the first sample
# after a STOP/START cycle comes at once, not a period after the previous one.
_SEQ_SLACK = 2


@dataclass
class MeterCounters:
    """Running totals of what came over the link (since the stream was created)."""

    bytes: int = 0
    lines: int = 0
    samples: int = 0
    crc_errors: int = 0
    malformed_lines: int = 0
    lost_samples: int = 0
    overflow_samples: int = 0
    meter_errors: int = 0
    reconnects: int = 0
    restarts: int = 0
    stalls: int = 0
    unidentified_samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Reading:
    """Mean bus voltage, current and power over some samples."""

    volts: float
    amps: float
    watts: float
    samples: int


class MeterStream:
    """Decodes one meter's byte stream and integrates its power over phases (see the module docstring)."""

    def __init__(self, *, rate_hz: float = 1000.0, max_bridge_samples: int = 4, history_seconds: float = 2.0,
                 gain_tolerance: float = 0.0, shunt_ohms: float | None = None, clock: ClockAligner | None = None,
                 warmup_seconds: float = 0.25):
        if max_bridge_samples < 0:
            raise ValueError(f"max_bridge_samples must be >= 0, got {max_bridge_samples}")
        if shunt_ohms is not None and not shunt_ohms > 0:
            raise ValueError(f"shunt_ohms must be positive, got {shunt_ohms!r}")
        self.counters = MeterCounters()
        self.clock = clock or ClockAligner()
        self.integrator = EnergyIntegrator(history_seconds=history_seconds, gain_tolerance=gain_tolerance,
                                           counters=self.counters.as_dict)
        self.identity: Identity | None = None
        self.identities_seen = 0
        self.identity_error: ProtocolError | None = None  # why the last #QFLM line was refused
        self.acks: deque[Ack] = deque(maxlen=32)
        self.faults: deque[MeterFault] = deque(maxlen=32)
        self.ack_count = 0
        self.needs_start = False
        self.last_sample_host: float | None = None
        self.max_bridge_samples = max_bridge_samples
        self._shunt_override = shunt_ohms
        self._amps_per_count = 0.0
        self._shunt_limit = 0
        self._splitter = LineSplitter()
        self._overlong_seen = 0
        self._expect_identity = False
        self._prev: tuple | None = None  # (seq, t_us, t_s, h, watts, valid) of the last placed sample
        self._last_seen: tuple[int, int] | None = None  # (seq, t_us) of the last sample received
        self._pending: list[tuple] = []
        self._warming = True
        self.warmup_seconds = warmup_seconds
        self._live = [0.0, 0.0, 0.0, 0]
        self.set_rate(rate_hz)

    # --- configuration ---------------------------------------------------------------------------
    def set_rate(self, rate_hz: float) -> None:
        """The sample rate the meter was started at; sets how long an interval may be and still be bridged."""
        if not rate_hz > 0:
            raise ValueError(f"rate must be positive, got {rate_hz!r}")
        self.rate_hz = float(rate_hz)
        self._max_interval = (self.max_bridge_samples + 1.5) / self.rate_hz

    @property
    def shunt_ohms(self) -> float | None:
        if self._shunt_override is not None:
            return self._shunt_override
        return self.identity.shunt_ohms if self.identity else None

    def expect_identity(self) -> None:
        """The host just asked ``ID?``: the next identity line is an answer, not a meter reboot."""
        self._expect_identity = True
        self.identity_error = None

    def disconnected(self) -> None:
        """The link went away: the next sample starts a new run with a fresh clock fit."""
        self.counters.reconnects += 1
        self._break()

    # --- bytes in --------------------------------------------------------------------------------
    def feed(self, data: bytes, host_time: float) -> None:
        """Process bytes read at ``host_time`` (host monotonic seconds)."""
        counters = self.counters
        counters.bytes += len(data)
        for line in self._splitter.feed(data):
            counters.lines += 1
            try:
                message = parse_line(line)
            except ProtocolError as exc:
                if exc.reason == "crc":
                    counters.crc_errors += 1
                else:
                    counters.malformed_lines += 1
                    if exc.reason == "format" and line.startswith(b"#QFLM,"):
                        self.identity_error = exc
                continue
            kind = type(message)
            if kind is Sample:
                self._on_sample(message, host_time)
            elif kind is Identity:
                self._on_identity(message)
            elif kind is MeterFault:
                counters.meter_errors += 1
                self.faults.append(message)
            else:
                self.acks.append(message)
                self.ack_count += 1
        overlong = self._splitter.overlong
        if overlong != self._overlong_seen:
            counters.malformed_lines += overlong - self._overlong_seen
            self._overlong_seen = overlong

    def _on_identity(self, identity: Identity) -> None:
        self.identity = identity
        self.identities_seen += 1
        shunt = self.shunt_ohms
        self._amps_per_count = SHUNT_LSB_VOLTS / shunt if shunt else 0.0
        self._shunt_limit = decode_config(identity.config).shunt_full_scale_raw
        if self._expect_identity:
            self._expect_identity = False
        elif self._last_seen is not None:  # unasked identity mid-stream: the meter rebooted
            self.counters.restarts += 1
            self.needs_start = True
            self._break()

    def _break(self) -> None:
        self._flush_warmup()
        self._prev = None
        self._last_seen = None
        self._warming = True
        self.clock.reset()
        self._splitter.reset()

    def _on_sample(self, s: Sample, host_time: float) -> None:
        counters = self.counters
        if not self._amps_per_count:
            counters.unidentified_samples += 1
            return
        last = self._last_seen
        if not self._plausible(s, last):
            counters.malformed_lines += 1
            return
        if last is not None and (s.seq <= last[0] or s.t_us <= last[1]):
            counters.restarts += 1  # time or sequence went backwards: a new meter epoch
            self.needs_start = True
            self._break()
        self._last_seen = (s.seq, s.t_us)
        t = s.t_us * 1e-6
        self.clock.observe(t, host_time)
        self.last_sample_host = host_time
        raw = s.shunt_raw
        signed = raw - 0x10000 if raw & 0x8000 else raw
        bus = s.bus_raw
        valid = not (bus & 1) and -self._shunt_limit < signed < self._shunt_limit
        volts = (bus >> 3) * BUS_LSB_VOLTS
        amps = signed * self._amps_per_count
        watts = volts * amps
        counters.samples += 1
        if valid:
            live = self._live
            live[0] += volts
            live[1] += amps
            live[2] += watts
            live[3] += 1
        else:
            counters.overflow_samples += 1
        if self._warming:
            # Hold the first samples of a run back until the clock fit has a bucket of minima:
            # placed with the very first arrival's delay, the run would start late on the host's clock.
            pending = self._pending
            pending.append((s.seq, s.t_us, t, watts, valid))
            if t - pending[0][2] >= self.warmup_seconds:
                self._flush_warmup()
            return
        self._place(s.seq, s.t_us, t, watts, valid)

    @staticmethod
    def _plausible(s: Sample, last: tuple[int, int] | None) -> bool:
        """False for a sample no meter can send: counters beyond MAX_COUNTER, or more seq steps than
        sample slots (at the protocol's highest rate) since the last sample on the meter's own clock.

        Such a line passed its CRC but cannot be true; taken as is, it would add its whole seq jump
        to ``lost_samples``. It is dropped like a malformed line (seq or t_us going backwards is a restart).
        """
        if s.seq >= MAX_COUNTER or s.t_us >= MAX_COUNTER:
            return False
        if last is None or s.seq <= last[0] or s.t_us <= last[1]:
            return True
        slots = (s.t_us - last[1]) * MAX_RATE_HZ // 1_000_000
        return s.seq - last[0] <= slots + _SEQ_SLACK

    def _flush_warmup(self) -> None:
        self._warming = False
        pending, self._pending = self._pending, []
        for sample in pending:
            self._place(*sample)

    def _place(self, seq: int, t_us: int, t: float, watts: float, valid: bool) -> None:
        """Put one converted sample on the host clock and hand it to the integrator."""
        clock = self.clock
        h = clock.to_host(t)
        integrator = self.integrator
        integrator.clock_uncertainty_s = clock.uncertainty_s
        prev = self._prev
        if prev is not None:
            lost = seq - prev[0] - 1
            self.counters.lost_samples += lost
            dt = t - prev[2]
            if valid and prev[5] and dt <= self._max_interval:
                b = h if h > prev[3] else prev[3]
                integrator.interval(prev[3], b, prev[4], watts, dt * clock.rate, lost)
                self._prev = (seq, t_us, t, b, watts, True)
                return
        integrator.point(h, valid)
        self._prev = (seq, t_us, t, h, watts, valid)

    # --- phases and readings -----------------------------------------------------------------------
    def open_phase(self, name: str, start: float) -> PhaseToken:
        """Start integrating phase ``name`` at host time ``start``."""
        return self.integrator.open(name, start)

    def close_phase(self, token: PhaseToken, end: float) -> None:
        """End a phase at host time ``end``; final once a sample at or after ``end`` arrived."""
        self.integrator.close(token, end)

    def settle(self, token: PhaseToken) -> PhaseEnergy:
        """The phase's result now (the uncovered tail becomes a gap if its samples never came)."""
        return self.integrator.settle(token)

    def set_idle_watts(self, watts: float) -> None:
        """Baseline subtracted in ``joules_above_idle`` of phases finalised from now on."""
        self.integrator.idle_watts = watts

    def take_reading(self) -> Reading | None:
        """Mean V, A, W of the valid samples since the previous call (None if there were none)."""
        volts, amps, watts, n = self._live
        self._live = [0.0, 0.0, 0.0, 0]
        if n == 0:
            return None
        return Reading(volts / n, amps / n, watts / n, n)
