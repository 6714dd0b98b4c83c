"""Benchmark of the meter reader and the emulator; prints one JSON object.

    .venv/bin/python bench/meter.py [--seconds 4] [--rate 2000]

Figures:
- ``reader_cpu_fraction``: CPU time of this process (the PowerMeter thread;
  the main thread sleeps) per wall second while an emulated meter streams at
  ``--rate`` Hz into it (goal: below 0.10 of one core at 2 kHz);
- ``drain_cpu_fraction``: the baseline, measured in the same run on the same
  stream: a thread that only reads the port with the same pyserial calls and
  poll interval and throws the bytes away; ``reader_over_drain`` is the ratio;
- ``emulator_cpu_fraction``: CPU of the ``qfl meter emulate`` process at that rate;
- ``stream_lines_per_s``: ``MeterStream.feed`` (split, CRC, parse, convert,
  clock, integrate with one open phase) on a prepared buffer;
  ``framing_lines_per_s``: the baseline of splitting and checking the CRC only.
Each CPU figure is the median of ``--repeats`` runs: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import serial

from edge.meter import PowerMeter
from edge.meter.protocol import LineSplitter, Identity, Sample, command, crc8, encode
from edge.meter.stream import MeterStream
from firmware_tools.emulator import ProcessWatcher


def _wait_for(path: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"emulator did not create {path}")
        time.sleep(0.02)


def reader_cpu(link: Path, rate: int, seconds: float, emulator_pid: int) -> tuple[float, float]:
    """(CPU fraction of this process with a PowerMeter streaming, CPU fraction of the emulator meanwhile)."""
    with PowerMeter(str(link), rate_hz=rate, idle_seconds=0) as meter, ProcessWatcher(emulator_pid) as emulator:
        time.sleep(0.5)
        cpu0, emu0, wall0 = time.process_time(), emulator.sample().cpu_seconds, time.monotonic()
        time.sleep(seconds)
        cpu1, emu1, wall1 = time.process_time(), emulator.sample().cpu_seconds, time.monotonic()
        samples = meter.counters.samples
    if samples < rate * seconds * 0.9:
        raise SystemExit(f"only {samples} samples arrived; the emulator cannot keep {rate} Hz here")
    return (cpu1 - cpu0) / (wall1 - wall0), (emu1 - emu0) / (wall1 - wall0)


def drain_cpu(link: Path, rate: int, seconds: float, poll: float = 0.005) -> float:
    """CPU fraction of a thread that only reads the stream and discards it (the floor of any reader)."""
    port = serial.Serial(str(link), 115200, timeout=0.1)
    port.reset_input_buffer()
    port.write(command("START", rate))
    stop = threading.Event()
    used: list[float] = []

    def drain() -> None:
        time.sleep(0.5)
        cpu0, wall0 = time.thread_time(), time.monotonic()
        while not stop.is_set():
            began = time.monotonic()
            data = port.read(port.in_waiting or 1)
            waiting = port.in_waiting
            if waiting:
                data += port.read(waiting)
            pause = poll - (time.monotonic() - began)
            if len(data) < 4096 and pause > 0:
                time.sleep(pause)
        used.append((time.thread_time() - cpu0) / (time.monotonic() - wall0))

    thread = threading.Thread(target=drain)
    thread.start()
    time.sleep(seconds + 0.5)
    stop.set()
    thread.join()
    port.write(command("STOP"))
    port.close()
    return used[0]


def parse_throughput(lines: int = 200_000) -> tuple[float, float]:
    """(lines/s through MeterStream.feed, lines/s through splitting and CRC checking alone)."""
    data = b"".join(encode(Sample(i, 1000 * i + 500, 0x1388 + (i % 7), 0x2712)) for i in range(lines))
    chunk = 35 * 40  # about what 20 ms of a 2 kHz stream brings per read
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    stream = MeterStream(rate_hz=2000)
    stream.feed(encode(Identity(1, "bench", "1", 100, 0x399F, 4096)), 0.0)
    stream.open_phase("bench", 0.0)
    began = time.perf_counter()
    for k, piece in enumerate(chunks):
        stream.feed(piece, k * 0.02)
    full = lines / (time.perf_counter() - began)

    splitter = LineSplitter()
    began = time.perf_counter()
    ok = 0
    for piece in chunks:
        for line in splitter.feed(piece):
            star = line.rfind(b"*")
            ok += crc8(line[:star]) == int(line[star + 1:], 16)
    framing = lines / (time.perf_counter() - began)
    if ok != lines:
        raise SystemExit(f"framing baseline rejected {lines - ok} good lines")
    return full, framing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    quiet = subprocess.Popen(["sleep", "3600"])
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "meter"
        emulator = subprocess.Popen([sys.executable, "-m", "edge.cli", "meter", "emulate", "--pid", str(quiet.pid),
                                     "--board", "pi4", "--link", str(link), "--rate", str(args.rate)],
                                    stderr=subprocess.DEVNULL)
        try:
            _wait_for(link)
            readers, emulators, drains = [], [], []
            for _ in range(args.repeats):
                reader, emu = reader_cpu(link, args.rate, args.seconds, emulator.pid)
                readers.append(reader)
                emulators.append(emu)
                drains.append(drain_cpu(link, args.rate, args.seconds))
        finally:
            emulator.terminate()
            emulator.wait(10)
            quiet.kill()
            quiet.wait()
    full, framing = parse_throughput()
    reader, drain = statistics.median(readers), statistics.median(drains)
    print(json.dumps({
        "rate_hz": args.rate,
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "reader_cpu_fraction": round(reader, 4),
        "reader_cpu_fraction_runs": [round(x, 4) for x in readers],
        "reader_cpu_goal": 0.10,
        "drain_cpu_fraction": round(drain, 4),
        "reader_over_drain": round(reader / drain, 2) if drain > 0 else None,
        "emulator_cpu_fraction": round(statistics.median(emulators), 4),
        "stream_lines_per_s": round(full),
        "framing_lines_per_s": round(framing),
        "stream_over_framing": round(full / framing, 3),
        "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
