"""Emulate an INA219 meter for a running process, on a pseudo-terminal.

    qfl meter emulate --pid 1234 --board pi4 --link /tmp/qfl-meter0 [--ground-truth truth.csv] [faults]

Creates a pseudo-terminal, points ``--link`` at it and streams the meter
protocol computed from the watched process's CPU time and writes until that
process ends or the emulator gets SIGTERM/SIGINT; it then removes the link.
Read it with ``qfl meter read --port LINK``. See docs/meter-protocol.md and
docs/boards.md.
"""

from __future__ import annotations

import argparse
import signal
import sys

from edge.cli import CommandError
from firmware_tools.emulator import (BoardError, EmulatorError, FaultError, FaultPlan, MeterEmulator, WatchError,
                                     parse_window)
from firmware_tools.emulator.ptylink import LinkError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pid", type=int, required=True, help="process whose CPU time and writes make the power")
    parser.add_argument("--board", default="pi4", help="board profile from firmware_tools/emulator/boards.toml "
                                                       "(pi-zero-2w, pi4, pi5)")
    parser.add_argument("--link", required=True, help="path of the symlink to the emulated serial device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the power noise and of the faults")
    parser.add_argument("--rate", type=int, default=1000, help="highest sample rate the emulated meter accepts (Hz)")
    parser.add_argument("--tick-ms", type=float, default=10.0,
                        help="how often the watched process is read; shorter follows millisecond phases more "
                             "closely and costs more CPU (1..500)")
    parser.add_argument("--ground-truth", metavar="FILE.csv", help="write the true emulated power of every sample")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="probability of losing a sample line")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help="probability of flipping a bit in a sample line")
    parser.add_argument("--unplug", action="append", default=[], metavar="AT:SECONDS",
                        help="unplug the meter AT seconds after start for SECONDS (repeatable)")
    parser.add_argument("--overflow-burst", action="append", default=[], metavar="AT:SECONDS",
                        help="drive the current beyond the PGA range AT seconds after start for SECONDS (repeatable)")
    parser.add_argument("--drift-ppm", type=float, default=0.0, help="meter clock runs this many ppm fast (negative: slow)")
    parser.add_argument("--meter-id", help="name in the identification line (default emu-BOARD-PID)")
    parser.add_argument("--boards", metavar="FILE.toml", help="read board profiles from this file instead")


def run(args: argparse.Namespace) -> int:
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
