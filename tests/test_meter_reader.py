"""The reader: clock fit, energy integration and link faults on synthetic streams (pure), then
PowerMeter on real pseudo-terminals fed by the emulator."""

from __future__ import annotations

import contextlib
import math
import os
import pty
import select
import subprocess
import sys
import threading
import time
import tty
from typing import Callable

import numpy as np
import pytest

from edge.meter import MeterError, MeterTimeout, PhaseEnergy, PowerMeter
from edge.meter.clock import ClockAligner
from edge.meter.errors import MeterClosed, ProtocolError, UnknownPhase
from edge.meter.protocol import Identity, Sample, encode, frame
from edge.meter.stream import MeterStream
from firmware_tools.emulator import FaultPlan, MeterEmulator, Window, read_ground_truth, truth_energy

HOST0 = 1000.0
SHUNT = 0.1


# --- synthetic streams --------------------------------------------------------------------------------
def profile(t: np.ndarray) -> np.ndarray:
    """Watts at host seconds ``t``: 3 W, +2 W steps for 2 s every 4 s, a 0.5 W/s sawtooth ramp."""
    return 3.0 + np.where((t % 4.0) < 2.0, 2.0, 0.0) + 0.5 * (t % 1.0)


def exact_energy(start: float, end: float) -> float:
    t = np.linspace(start, end, int((end - start) * 200_000) + 1)
    p = profile(t - HOST0)
    return float(np.sum((p[1:] + p[:-1]) * np.diff(t)) / 2)  # np.trapezoid is numpy >= 2 only


def make_lines(seconds: float, rate: int, drift_ppm: float) -> tuple[np.ndarray, list[bytes]]:
    n = int(seconds * rate)
    host = HOST0 + np.arange(n) / rate
    meter_s = (host - HOST0) * (1 + drift_ppm * 1e-6) + 7.0
    power = profile(host - HOST0)
    volts = 5.0 - 0.02 * power
    amps = power / volts
    shunt = np.round(amps * SHUNT / 10e-6).astype(int)
    bus = (np.round(volts / 4e-3).astype(int) << 3) | 0x2
    lines = [encode(Sample(i, int(round(meter_s[i] * 1e6)), int(shunt[i]) & 0xFFFF, int(bus[i]))) for i in range(n)]
    return host, lines


def arrivals(host: np.ndarray, jitter: str, rng: np.random.Generator) -> np.ndarray:
    """When each line reaches the host: 'batched' = the host reads every 0-20 ms and gets what came
    (plus 0.5 ms transport); 'per-line' = each line independently 0-20 ms late, in order."""
    if jitter == "batched":
        reads = HOST0 + np.cumsum(rng.uniform(0.0, 0.02, int((host[-1] - HOST0) / 0.01) + 200))
        return reads[np.searchsorted(reads, host + 0.0005)]
    return np.maximum.accumulate(host + rng.uniform(0.0, 0.02, len(host)))


def drive(stream: MeterStream, arrive: np.ndarray, lines: list[bytes], phases: list[tuple[str, float, float]],
          extra: dict[int, bytes] | None = None) -> dict[str, PhaseEnergy]:
    """Feed lines grouped by arrival; open and close each phase once the host clock passes its times."""
    stream.feed(encode(Identity(1, "synthetic", "t", SHUNT * 1e3, 0x399F, 4096)), arrive[0] - 0.5)
    tokens = {}
    cut = np.flatnonzero(np.diff(arrive)) + 1
    for chunk in np.split(np.arange(len(lines)), cut):
        now = float(arrive[chunk[0]])
        for name, start, end in phases:
            if name not in tokens and now >= start:
                tokens[name] = stream.open_phase(name, start)
            token = tokens.get(name)
            if token is not None and token.end == math.inf and now >= end:
                stream.close_phase(token, end)
        data = b"".join(lines[i] + (extra or {}).get(i, b"") for i in chunk)
        stream.feed(data, now)
    return {name: stream.settle(token) for name, token in tokens.items()}


# --- clock alignment -------------------------------------------------------------------------------------
@pytest.mark.parametrize("drift_ppm", [-200.0, 200.0])
def test_clock_fit_recovers_offset_and_drift(drift_ppm):
    rng = np.random.default_rng(1)
    host = HOST0 + np.arange(0, 20, 0.001)
    meter = (host - HOST0) * (1 + drift_ppm * 1e-6) + 3.0
    arrive = arrivals(host, "batched", rng)
    clock = ClockAligner()
    worst = 0.0
    for k, (m, a, h) in enumerate(zip(meter, arrive, host)):
        clock.observe(m, a)
        if k > 2000:
            worst = max(worst, abs(clock.to_host(m) - h))
    assert clock.drift_ppm == pytest.approx(drift_ppm, abs=5.0)
    assert worst < 1.5e-3  # the 0.5 ms transport delay is invisible to any fit; the rest is jitter
    assert clock.to_meter(clock.to_host(12.0)) == pytest.approx(12.0, abs=1e-9)


def test_clock_fit_stays_under_every_arrival_and_bounded_under_per_line_jitter():
    rng = np.random.default_rng(2)
    host = HOST0 + np.arange(0, 15, 0.001)
    meter = (host - HOST0) * (1 - 150e-6)
    arrive = arrivals(host, "per-line", rng)
    clock = ClockAligner()
    for m, a in zip(meter, arrive):
        clock.observe(m, a)
        assert clock.to_host(m) <= a + 1e-12  # no line can arrive before it was sampled
    assert abs(clock.to_host(meter[-1]) - host[-1]) < 0.02
    assert abs(clock.drift_ppm + 150) < 500


@pytest.mark.parametrize("mode", ["batched", "per-line"])
def test_clock_drift_comes_with_an_uncertainty_that_covers_its_error_and_shrinks_with_time(mode):
    bounds = {}
    for seconds in (1.5, 20.0):
        for seed, drift_ppm in enumerate((-200.0, 0.0, 150.0)):
            rng = np.random.default_rng(seed)
            host = HOST0 + np.arange(0, seconds, 0.001)
            meter = (host - HOST0) * (1 + drift_ppm * 1e-6) + 3.0
            clock = ClockAligner()
            assert clock.drift_uncertainty_ppm is None
            for m, a in zip(meter, arrivals(host, mode, rng)):
                clock.observe(m, a)
            assert abs(clock.drift_ppm - drift_ppm) <= clock.drift_uncertainty_ppm
            bounds.setdefault(seconds, []).append(clock.drift_uncertainty_ppm)
    assert max(bounds[20.0]) < min(bounds[1.5])


def test_clock_has_no_drift_uncertainty_before_it_has_a_slope():
    clock = ClockAligner()
    for k in range(200):                    # 0.2 s: inside the first bucket, no line fitted yet
        clock.observe(k * 0.001, HOST0 + k * 0.001)
    assert clock.drift_ppm == 0.0 and clock.drift_uncertainty_ppm is None


def test_clock_rejects_bad_settings():
    with pytest.raises(ValueError):
        ClockAligner(bucket_seconds=1.0, window_seconds=0.5)


# --- energy integration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("drift_ppm", [-200.0, 200.0])
@pytest.mark.parametrize("jitter", ["batched", "per-line"])
def test_energy_of_10_s_phases_within_half_a_percent(drift_ppm, jitter):
    host, lines = make_lines(23.0, 1000, drift_ppm)
    arrive = arrivals(host, jitter, np.random.default_rng(3))
    phases = [("a", HOST0 + 1.0, HOST0 + 11.0), ("b", HOST0 + 11.0, HOST0 + 21.0)]
    result = drive(MeterStream(rate_hz=1000), arrive, lines, phases)
    for name, start, end in phases:
        energy = result[name]
        exact = exact_energy(start, end)
        assert abs(energy.joules - exact) / exact < 0.005, (name, energy.joules, exact)
        assert not energy.partial and energy.gap_seconds == 0
        assert 9990 <= energy.samples <= 10010
        assert energy.seconds == pytest.approx(10.0)
        assert energy.mean_watts == pytest.approx(exact / 10.0, rel=0.005)


def test_lost_lines_are_bridged_and_counted():
    host, lines = make_lines(6.0, 1000, 0.0)
    arrive = arrivals(host, "batched", np.random.default_rng(4))
    keep = np.ones(len(lines), bool)
    keep[[1500, 2200, 2201, 3900]] = False
    energy = drive(MeterStream(), arrive[keep], [x for x, k in zip(lines, keep) if k],
                   [("p", HOST0 + 1.0, HOST0 + 5.0)])["p"]
    assert energy.lost_samples == 4 and not energy.partial
    assert energy.joules == pytest.approx(exact_energy(HOST0 + 1.0, HOST0 + 5.0), rel=1e-3)


def test_a_long_hole_is_a_gap_and_the_phase_is_partial():
    host, lines = make_lines(6.0, 1000, 0.0)
    arrive = arrivals(host, "batched", np.random.default_rng(5))
    keep = np.ones(len(lines), bool)
    keep[2500:2600] = False  # 100 ms of lines lost: far beyond the 4 lines that may be bridged
    energy = drive(MeterStream(), arrive[keep], [x for x, k in zip(lines, keep) if k],
                   [("p", HOST0 + 1.0, HOST0 + 5.0)])["p"]
    assert energy.partial and len(energy.gaps) == 1
    assert energy.gap_seconds == pytest.approx(0.101, abs=0.002)
    (lo, hi), = energy.gaps
    intact = exact_energy(HOST0 + 1.0, lo) + exact_energy(hi, HOST0 + 5.0)
    assert energy.joules == pytest.approx(intact, rel=2e-3)
    assert energy.covered_seconds == pytest.approx(4.0 - energy.gap_seconds, abs=2e-3)
    assert "PARTIAL" in energy.summary()


def test_overflow_samples_are_counted_and_never_integrated():
    host, lines = make_lines(4.0, 1000, 0.0)
    lines[2000] = encode(Sample(2000, int(round(((host[2000] - HOST0) + 7.0) * 1e6)), 0x7D00, 0x2713))
    energy = drive(MeterStream(), arrivals(host, "batched", np.random.default_rng(6)), lines,
                   [("p", HOST0 + 1.0, HOST0 + 3.0)])["p"]
    assert energy.overflow_samples == 1 and energy.partial
    assert energy.gap_seconds == pytest.approx(0.002, abs=2e-4)  # the intervals on both sides of it
    assert energy.joules < exact_energy(HOST0 + 1.0, HOST0 + 3.0)


def test_garbage_and_corrupted_lines_are_skipped_and_counted():
    host, lines = make_lines(4.0, 1000, 0.0)
    lines[1700] = lines[1700][:5] + b"X" + lines[1700][6:]
    extra = {1200: b"\x00\xff garbage without end " * 10, 2500: b"\r\n\r\nnoise*00\n"}
    stream = MeterStream()
    energy = drive(stream, arrivals(host, "batched", np.random.default_rng(7)), lines,
                   [("p", HOST0 + 1.0, HOST0 + 3.0)], extra=extra)["p"]
    counters = stream.counters
    assert counters.crc_errors >= 2 and counters.malformed_lines >= 1
    assert not energy.partial and energy.lost_samples >= 2  # line 1201 swallowed by the garbage, 1700 bad
    assert energy.crc_errors == counters.crc_errors  # all happened inside the phase
    assert energy.joules == pytest.approx(exact_energy(HOST0 + 1.0, HOST0 + 3.0), rel=1e-3)


def test_a_meter_restart_breaks_the_run_and_asks_for_start():
    stream = MeterStream()
    stream.feed(encode(Identity(1, "m", "1", 100, 0x399F, 4096)), 0.0)
    for i in range(1000):
        stream.feed(encode(Sample(i, 5_000_000 + i * 1000, 0x1388, 0x2712)), 10.0 + i * 0.001)
    token = stream.open_phase("p", 10.9)
    for i in range(600):  # rebooted: sequence and clock start again
        stream.feed(encode(Sample(i, 1000 + i * 1000, 0x1388, 0x2712)), 11.2 + i * 0.001)
    stream.close_phase(token, 11.7)
    energy = stream.settle(token)
    assert stream.counters.restarts == 1 and stream.needs_start
    assert energy.partial and energy.gap_seconds == pytest.approx(0.201, abs=0.01)


def test_unasked_identification_means_a_reboot():
    stream = MeterStream()
    stream.expect_identity()
    stream.feed(encode(Identity(1, "m", "1", 100, 0x399F, 4096)), 0.0)
    stream.feed(encode(Sample(0, 1000, 0x1388, 0x2712)), 0.01)
    assert stream.counters.restarts == 0 and not stream.needs_start
    stream.feed(encode(Identity(1, "m", "1", 100, 0x399F, 4096)), 0.02)
    assert stream.counters.restarts == 1 and stream.needs_start


def test_samples_before_identification_are_not_guessed():
    stream = MeterStream()
    stream.feed(encode(Sample(0, 1000, 0x1388, 0x2712)), 0.0)
    assert stream.counters.unidentified_samples == 1 and stream.take_reading() is None


def test_phase_without_data_is_entirely_a_gap():
    stream = MeterStream()
    token = stream.open_phase("p", 5.0)
    stream.close_phase(token, 6.0)
    energy = stream.settle(token)
    assert energy.partial and energy.gap_seconds == pytest.approx(1.0)
    assert energy.joules == 0 and energy.mean_watts == 0 and energy.samples == 0


def test_idle_baseline_and_uncertainty():
    host, lines = make_lines(5.0, 1000, 0.0)
    stream = MeterStream(gain_tolerance=0.005)
    stream.set_idle_watts(3.0)
    energy = drive(stream, arrivals(host, "batched", np.random.default_rng(8)), lines,
                   [("p", HOST0 + 1.0, HOST0 + 4.0)])["p"]
    assert energy.joules_above_idle == pytest.approx(energy.joules - 3.0 * energy.covered_seconds)
    assert energy.idle_watts == 3.0
    assert 0.005 * energy.joules < energy.uncertainty_j < 0.02 * energy.joules


def test_phase_misuse_is_refused():
    stream = MeterStream()
    token = stream.open_phase("p", 1.0)
    with pytest.raises(ValueError, match="still open"):
        stream.settle(token)
    with pytest.raises(ValueError, match="before it starts"):
        stream.close_phase(token, 0.5)
    stream.close_phase(token, 2.0)
    with pytest.raises(ValueError, match="already ended"):
        stream.close_phase(token, 3.0)


# --- PowerMeter on a real pseudo-terminal ----------------------------------------------------------------


def test_power_meter_reads_the_emulator(tmp_path, worker):
    link, truth_file = tmp_path / "meter", tmp_path / "truth.csv"
    with MeterEmulator(pid=worker.pid, link=link, board="pi4", seed=11, ground_truth=truth_file):
        meter = PowerMeter(str(link), idle_seconds=0.3)
        assert repr(meter).startswith(f"<PowerMeter port={str(link)!r} state=streaming meter='emu-pi4-")
        assert meter.identity.shunt_ohms == 0.1 and meter.idle_watts > 2.5
        with meter.phase("work") as phase:
            time.sleep(1.2)
        energy = meter.phase_energy("work")
        assert phase.energy() is energy
        reading = meter.live()
        meter.close()
        meter.close()  # safe twice
    assert "state=closed" in repr(meter)
    truth = truth_energy(read_ground_truth(truth_file), energy.start, energy.end)
    assert energy.joules == pytest.approx(truth, rel=0.005)
    assert not energy.partial and 1150 <= energy.samples <= 1250
    assert reading is not None and 4.8 < reading.volts < 5.1 and reading.samples > 100
    assert meter.counters.crc_errors == 0
    with pytest.raises(MeterClosed):
        meter.phase("late").begin()
    with pytest.raises(UnknownPhase, match="no completed phase named 'nothing'"):
        meter.phase_energy("nothing")


def test_power_meter_as_context_manager_with_calibration_and_config(tmp_path, worker):
    link = tmp_path / "meter"
    with MeterEmulator(pid=worker.pid, link=link, board="pi4", seed=12):
        with PowerMeter(str(link), idle_seconds=0, shunt_ohms=0.1, current_lsb_amps=50e-6, config=0x199F,
                        rate_hz=500) as meter:
            assert meter.identity.calibration == 8192 and meter.identity.config == 0x199F
            with meter.phase("p"):
                time.sleep(0.4)
            energy = meter.phase_energy("p")
            assert 180 <= energy.samples <= 220 and 2.5 < energy.mean_watts < 6.5
        assert meter.state == "closed"


def test_power_meter_reconnects_after_the_port_vanishes(tmp_path, worker):
    link, truth_file = tmp_path / "meter", tmp_path / "truth.csv"
    faults = FaultPlan(unplugs=(Window(1.2, 0.6),))
    with MeterEmulator(pid=worker.pid, link=link, board="pi-zero-2w", seed=13, ground_truth=truth_file,
                       faults=faults):
        with PowerMeter(str(link), idle_seconds=0.2) as meter:
            with meter.phase("across"):
                time.sleep(2.6)
            energy = meter.phase_energy("across")
            assert meter.state == "streaming"
    assert energy.reconnects == 1 and energy.partial
    assert 0.6 <= energy.gap_seconds < 2.0
    truth = truth_energy(read_ground_truth(truth_file), energy.start, energy.end, exclude=energy.gaps)
    assert energy.joules == pytest.approx(truth, rel=0.01)


def test_a_silent_port_times_out():
    master, slave = os.openpty()
    try:
        began = time.monotonic()
        with pytest.raises(MeterTimeout, match="firmware") as info:
            PowerMeter(os.ttyname(slave), timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - began < 3.0
    finally:
        os.close(master)
        os.close(slave)


def test_missing_port_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(MeterError, match="cannot open meter port"):
        PowerMeter(str(tmp_path / "nothing-here"))
    with pytest.raises(MeterError, match="rate_hz"):
        PowerMeter("/dev/null", rate_hz=0)
    with pytest.raises(MeterError, match="idle_seconds"):
        PowerMeter("/dev/null", idle_seconds=-1)
    with pytest.raises(MeterError, match="config"):
        PowerMeter("/dev/null", config=0x12345)


class ScriptedMeter:
    """A meter on a real pseudo-terminal that answers STOP, ID? and START with the given lines and,
    once started, sends ``samples(seq, t_us)`` (a list of line bodies) for every 1 ms slot."""

    IDENTITY = "#QFLM,1,fake-1,1.0.0,100,399F,1000"

    def __init__(self, identity: str = IDENTITY, start_ack: str = "OK,START,{rate}",
                 samples: Callable[[int, int], list[str]] = lambda seq, t_us: [f"S,{seq},{t_us},03E8,2712"]):
        self.identity, self.start_ack, self.samples = identity, start_ack, samples
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self.slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScriptedMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.master)
        os.close(self.slave)

    def _send(self, body: str) -> None:
        with contextlib.suppress(OSError):  # nobody reads: a meter's USB buffer would drop it too
            os.write(self.master, frame(body))

    def _answer(self, line: bytes) -> bool:
        """Answer one command; True when it started sampling."""
        words = line.split(b"*")[0].decode().split()
        name = words[0].upper() if words else ""
        if name == "STOP":
            self._send(f"OK,STOP,{self._seq}")
        elif name == "ID?":
            self._send(self.identity)
        elif name == "START":
            self._send(self.start_ack.format(rate=words[1]))
            return True
        return False

    def _run(self) -> None:
        self._seq, t_us, started, buf, began = 0, 0, False, b"", time.monotonic()
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.002)[0]:
                with contextlib.suppress(OSError):
                    buf += os.read(self.master, 4096)
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    started = self._answer(line) or started
            now_us = int((time.monotonic() - began) * 1e6)
            while started and t_us + 1000 <= now_us:
                t_us += 1000
                for body in self.samples(self._seq, t_us):
                    self._send(body)
                self._seq += 1


@pytest.mark.parametrize("shunt", ["nan", "-100", "0", "inf", "-inf"])
def test_an_identity_with_an_unusable_shunt_is_a_protocol_error(shunt):
    with ScriptedMeter(identity=f"#QFLM,1,fake-1,1.0.0,{shunt},399F,1000") as fake:
        began = time.monotonic()
        with pytest.raises(ProtocolError, match=f"shunt resistance must be a positive finite number of milliohms, "
                                                f"got '{shunt}'"):
            PowerMeter(fake.port, idle_seconds=0, timeout=3.0)
        assert time.monotonic() - began < 2.0  # refused on sight, not after waiting for samples


def test_a_start_acknowledged_with_rate_0_is_one_protocol_error(caplog):
    with ScriptedMeter(start_ack="OK,START,0") as fake:
        with pytest.raises(ProtocolError, match="acknowledged START with rate '0'"):
            PowerMeter(fake.port, idle_seconds=0, timeout=2.0)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged


def test_a_sample_with_an_absurd_seq_is_malformed_not_lost_lines():
    def with_absurd(seq: int, t_us: int) -> list[str]:
        normal = f"S,{seq},{t_us},03E8,2712"
        absurd = f"S,99999999999999999999999,{t_us + 500},03E8,2712"  # seq and t_us both move on
        return [normal, absurd] if seq % 50 == 25 else [normal]

    with ScriptedMeter(samples=with_absurd) as fake:
        with PowerMeter(fake.port, idle_seconds=0) as meter:
            with meter.phase("p"):
                time.sleep(1.0)
            energy = meter.phase_energy("p")
            counters = meter.counters
    assert energy.lost_samples == 0 and counters.lost_samples == 0 and counters.restarts == 0
    assert energy.malformed_lines >= 15 and not energy.partial
    assert energy.mean_watts == pytest.approx(0.5, rel=1e-3)  # 10 mV on 0.1 ohm at 5 V


def test_samples_with_counters_beyond_the_protocol_are_counted_as_malformed():
    huge = 10**30
    with ScriptedMeter(samples=lambda seq, t_us: [f"S,{huge + seq},{huge + t_us},03E8,2712"]) as fake:
        with pytest.raises(MeterTimeout, match=r"did not send samples after START within 0.5 s \(\d+ lines came: "
                                               r"\d+ malformed, 0 CRC errors\)"):
            PowerMeter(fake.port, idle_seconds=0, timeout=0.5)


def test_a_seq_jump_the_meter_clock_allows_is_lost_lines_and_one_it_does_not_is_malformed():
    stream = MeterStream()
    stream.feed(encode(Identity(1, "m", "1", 100, 0x399F, 4096)), 0.0)
    for seq, t_us in ((0, 1000), (1, 2000), (10, 11000), (10**12, 12000), (11, 12000 + 10**6), (2**53, 2**53)):
        stream.feed(encode(Sample(seq, t_us, 0x1388, 0x2712)), t_us * 1e-6)
    counters = stream.counters
    # 10 after 1: 8 lines lost in 9 ms. 10**12 in 1 ms: impossible. 11 a second later: 0 lost.
    # 2**53: beyond the protocol.
    assert counters.malformed_lines == 2 and counters.samples == 4 and counters.restarts == 0
    assert counters.lost_samples == 8


def test_a_real_meter(meter_port):
    """Runs against hardware with ``pytest --meter-port /dev/ttyACM0`` (a Pico with the firmware and an INA219)."""
    if meter_port is None:
        pytest.skip("no --meter-port given")
    with PowerMeter(meter_port, idle_seconds=0.5) as meter:
        assert meter.identity.proto == 1 and meter.state == "streaming"
        with meter.phase("real"):
            time.sleep(1.0)
        energy = meter.phase_energy("real")
        reading = meter.live()
    assert not energy.partial and energy.samples > 900 and energy.crc_errors == 0
    assert reading is not None and 4.5 < reading.volts < 5.5  # a Pi's 5 V line
