"""Emulate the meters of many processes in one process, one pty each.

    qfl meter fleet --spec run/fleet.jsonl [--board pi4] [--tick-ms 10] [--stats run/fleet-stats.json]

Devices are listed in the spec file, one JSON object a line (``pid``,
``link``, ``seed``, optional ``ground_truth``, ``meter_id``); lines appended
while it runs are picked up within a tick. Runs until SIGTERM/SIGINT, then
closes every pty and ground-truth log and writes the loop's statistics.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from edge.cli import CommandError, given_path
from firmware_tools.emulator.boards import BoardError
from firmware_tools.emulator.cli import rate_hz, tick_ms
from firmware_tools.emulator.fleet import FleetEmulator, SpecError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", type=given_path, required=True, help="JSON-lines file listing the devices to emulate")
    parser.add_argument("--board", default="pi4", help="board profile (pi-zero-2w, pi4, pi5)")
    parser.add_argument("--rate", type=rate_hz, default=1000, help="highest sample rate the meters accept (Hz)")
    parser.add_argument("--tick-ms", type=tick_ms, default=10.0, help="how often every process is read (1..500)")
    parser.add_argument("--stats", type=Path, help="write the loop's statistics here as JSON at the end")
    parser.add_argument("--boards", metavar="FILE.toml", help="read board profiles from this file instead")


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"qfl meter fleet: {message}", file=sys.stderr, flush=True)

    if args.spec.is_dir():
        raise CommandError(f"--spec {args.spec} is a directory; give the JSON-lines file listing the devices")
    try:
        fleet = FleetEmulator(board=args.board, rate_hz=args.rate, tick_seconds=args.tick_ms / 1000.0,
                              boards_file=args.boards, log=say)
    except BoardError as exc:
        raise CommandError(str(exc)) from None
    previous = {sig: signal.signal(sig, lambda *_: fleet.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    say(f"{fleet.board.name} meters from {args.spec}, tick {args.tick_ms:g} ms")
    try:
        stats = fleet.run(args.spec)
    except SpecError as exc:
        raise CommandError(str(exc)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.stats is not None:
        args.stats.write_text(json.dumps(stats.to_json(), indent=2) + "\n")
    say(f"stopped; {stats.devices_added} meters, {stats.samples} samples, tick p50 {stats.interval_p50_ms:.1f} ms "
        f"p95 {stats.interval_p95_ms:.1f} ms, {stats.cpu_seconds:.1f} s CPU")
    return 0
