"""Read a power meter, or emulate one for a local process.

    qfl meter read --port /dev/ttyACM0 --seconds 10 [--json]
    qfl meter emulate --pid 1234 --board pi4 --link /tmp/qfl-meter0 [--ground-truth truth.csv] [faults]

``read`` prints a line a second to stderr (V, A, W) and an energy summary to
stdout. ``emulate`` creates a pseudo-terminal, points ``--link`` at it and
streams the meter protocol computed from the watched process's CPU time and
writes until that process ends or the emulator gets SIGTERM/SIGINT; it then
removes the link. See docs/meter-protocol.md and docs/boards.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from edge.cli import CommandError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{read,emulate}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    read = sub.add_parser("read", help="live readout and an energy summary from a meter", formatter_class=fmt)
    read.add_argument("--port", required=True, help="serial device of the meter, or an emulator's --link path")
    read.add_argument("--seconds", type=float, required=True, help="how long to read")
    read.add_argument("--rate", type=int, default=1000, help="samples per second to ask of the meter")
    read.add_argument("--idle-seconds", type=float, default=0.0,
                      help="measure an idle baseline first (for energy above idle); 0 skips it")
    read.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the meter to answer")
    read.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    emu = sub.add_parser("emulate", help="emulate a meter for a running process on a pseudo-terminal",
                         formatter_class=fmt)
    emu.add_argument("--pid", type=int, required=True, help="process whose CPU time and writes make the power")
    emu.add_argument("--board", default="pi4", help="board profile from firmware_tools/emulator/boards.toml "
                                                    "(pi-zero-2w, pi4, pi5)")
    emu.add_argument("--link", required=True, help="path of the symlink to the emulated serial device")
    emu.add_argument("--seed", type=int, default=0, help="seed of the power noise and of the faults")
    emu.add_argument("--rate", type=int, default=1000, help="highest sample rate the emulated meter accepts (Hz)")
    emu.add_argument("--tick-ms", type=float, default=10.0,
                     help="how often the watched process is read; shorter follows millisecond phases more "
                          "closely and costs more CPU (1..500)")
    emu.add_argument("--ground-truth", metavar="FILE.csv", help="write the true emulated power of every sample")
    emu.add_argument("--drop-rate", type=float, default=0.0, help="probability of losing a sample line")
    emu.add_argument("--corrupt-rate", type=float, default=0.0, help="probability of flipping a bit in a sample line")
    emu.add_argument("--unplug", action="append", default=[], metavar="AT:SECONDS",
                     help="unplug the meter AT seconds after start for SECONDS (repeatable)")
    emu.add_argument("--overflow-burst", action="append", default=[], metavar="AT:SECONDS",
                     help="drive the current beyond the PGA range AT seconds after start for SECONDS (repeatable)")
    emu.add_argument("--drift-ppm", type=float, default=0.0, help="meter clock runs this many ppm fast (negative: slow)")
    emu.add_argument("--meter-id", help="name in the identification line (default emu-BOARD-PID)")
    emu.add_argument("--boards", metavar="FILE.toml", help="read board profiles from this file instead")


def run(args: argparse.Namespace) -> int:
    if args.action == "read":
        return _read(args)
    return _emulate(args)


def _read(args: argparse.Namespace) -> int:
    from edge.meter.errors import MeterError
    from edge.meter.reader import PowerMeter

    if not args.seconds > 0:
        raise CommandError(f"--seconds must be positive, got {args.seconds}")
    try:
        meter = PowerMeter(args.port, rate_hz=args.rate, idle_seconds=args.idle_seconds, timeout=args.timeout)
    except MeterError as exc:
        raise CommandError(str(exc)) from None
    with meter:
        ident = meter.identity
        print(f"meter {ident.meter_id} (firmware {ident.firmware}, protocol {ident.proto}), shunt "
              f"{ident.shunt_milliohms:g} mOhm, config {ident.config:04X}, cal {ident.calibration:04X}",
              file=sys.stderr)
        phase = meter.phase("read").begin()
        began = time.monotonic()
        try:
            while True:
                left = began + args.seconds - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(1.0, left))
                reading = meter.live()
                elapsed = time.monotonic() - began
                if reading is None:
                    print(f"{elapsed:7.1f} s   no samples ({meter.state})", file=sys.stderr)
                else:
                    print(f"{elapsed:7.1f} s   {reading.volts:6.3f} V   {reading.amps:7.4f} A   {reading.watts:7.3f} W",
                          file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted: summary of what was read", file=sys.stderr)
        phase.end()
        energy = phase.energy()
        counters = meter.counters
        summary = {
            "port": args.port,
            "meter_id": ident.meter_id,
            "seconds": round(energy.seconds, 6),
            "joules": energy.joules,
            "mean_watts": energy.mean_watts,
            "uncertainty_j": energy.uncertainty_j,
            "idle_watts": meter.idle_watts if args.idle_seconds > 0 else None,
            "joules_above_idle": energy.joules_above_idle if args.idle_seconds > 0 else None,
            "samples": energy.samples,
            "lost_samples": energy.lost_samples,
            "overflow_samples": energy.overflow_samples,
            "gaps": len(energy.gaps),
            "gap_seconds": energy.gap_seconds,
            "partial": energy.partial,
            "crc_errors": energy.crc_errors,
            "malformed_lines": energy.malformed_lines,
            "reconnects": energy.reconnects,
            "drift_ppm": meter.drift_ppm,
            "total_samples": counters.samples,
        }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"energy      {summary['joules']:.4f} J +- {summary['uncertainty_j']:.4f} J over {summary['seconds']:.3f} s")
        print(f"mean power  {summary['mean_watts']:.4f} W")
        if summary["joules_above_idle"] is not None:
            print(f"above idle  {summary['joules_above_idle']:.4f} J (idle {summary['idle_watts']:.4f} W)")
        print(f"samples     {summary['samples']} ({summary['lost_samples']} lost, "
              f"{summary['overflow_samples']} overflow)")
        print(f"gaps        {summary['gaps']} ({summary['gap_seconds']:.3f} s){'  PARTIAL' if summary['partial'] else ''}")
        print(f"link        {summary['crc_errors']} CRC errors, {summary['malformed_lines']} malformed lines, "
              f"{summary['reconnects']} reconnects, clock drift {summary['drift_ppm']:+.1f} ppm")
    return 0


def _emulate(args: argparse.Namespace) -> int:
    from firmware_tools.emulator import (BoardError, EmulatorError, FaultError, FaultPlan, MeterEmulator,
                                         WatchError, parse_window)
    from firmware_tools.emulator.ptylink import LinkError

    def say(message: str) -> None:
        print(f"qfl meter emulate: {message}", file=sys.stderr, flush=True)

    try:
        plan = FaultPlan(drop_rate=args.drop_rate, corrupt_rate=args.corrupt_rate,
                         unplugs=tuple(parse_window(w) for w in args.unplug),
                         overflow_bursts=tuple(parse_window(w) for w in args.overflow_burst),
                         drift_ppm=args.drift_ppm)
        emulator = MeterEmulator(pid=args.pid, link=args.link, board=args.board, seed=args.seed, rate_hz=args.rate,
                                 ground_truth=args.ground_truth, faults=plan, meter_id=args.meter_id,
                                 boards_file=args.boards, tick_seconds=args.tick_ms / 1000.0, log=say)
    except (BoardError, FaultError, WatchError, EmulatorError) as exc:
        raise CommandError(str(exc)) from None

    previous = {sig: signal.signal(sig, lambda *_: emulator.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    say(f"{emulator.board.name} meter for process {args.pid} at {args.link}")
    try:
        emulator.run()
    except (LinkError, OSError) as exc:
        raise CommandError(f"cannot create the emulated device at {args.link}: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = emulator.stats
    say(f"{emulator.exit_reason}; {stats.samples} samples sent, {stats.dropped_lines} dropped, "
        f"{stats.corrupted_lines} corrupted, {stats.overflow_samples} overflow, {stats.unplugs} unplugs")
    return 0
