"""Emulate an INA219 meter for a running process, on a pseudo-terminal.

    qfl meter emulate --pid 1234 --board pi4 --link /tmp/qfl-meter0 [--ground-truth truth.csv] [faults]
        [--net lte-m --relay-port 18830 --upstream 127.0.0.1:1883]

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
from pathlib import Path

from edge.cli import CommandError, given_path
from firmware_tools.emulator import (BoardError, EmulatorError, FaultError, FaultPlan, MeterEmulator, WatchError,
                                     parse_window)
from firmware_tools.emulator.link import LinkProfileError, RadioLog, Relay, get_link
from firmware_tools.emulator.ptylink import LinkError
from firmware_tools.meter_firmware.main import MAX_RATE_HZ

TICK_MS = (1.0, 500.0)


def rate_hz(text: str) -> int:
    """An argparse type for a meter's highest sample rate: an integer 1..MAX_RATE_HZ."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer rate in Hz, got {text!r}") from None
    if not 1 <= value <= MAX_RATE_HZ:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_RATE_HZ} Hz, got {value}")
    return value


def tick_ms(text: str) -> float:
    """An argparse type for the emulator's tick in milliseconds, within :data:`TICK_MS`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    low, high = TICK_MS
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be within {low:g}..{high:g} ms, got {value:g}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pid", type=int, required=True, help="process whose CPU time and writes make the power")
    parser.add_argument("--board", default="pi4", help="board profile from firmware_tools/emulator/boards.toml "
                                                       "(pi-zero-2w, pi4, pi5)")
    parser.add_argument("--link", type=given_path, required=True, help="path of the symlink to the emulated serial device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the power noise and of the faults")
    parser.add_argument("--rate", type=rate_hz, default=1000, help="highest sample rate the emulated meter accepts (Hz)")
    parser.add_argument("--tick-ms", type=tick_ms, default=10.0,
                        help="how often the watched process is read; shorter follows millisecond phases more "
                             "closely and costs more CPU (1..500)")
    parser.add_argument("--ground-truth", type=given_path, metavar="FILE.csv",
                        help="write the true emulated power of every sample")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="probability of losing a sample line")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help="probability of flipping a bit in a sample line")
    parser.add_argument("--unplug", action="append", default=[], metavar="AT:SECONDS",
                        help="unplug the meter AT seconds after start for SECONDS (repeatable)")
    parser.add_argument("--overflow-burst", action="append", default=[], metavar="AT:SECONDS",
                        help="drive the current beyond the PGA range AT seconds after start for SECONDS (repeatable)")
    parser.add_argument("--drift-ppm", type=float, default=0.0, help="meter clock runs this many ppm fast (negative: slow)")
    parser.add_argument("--meter-id", help="name in the identification line (default emu-BOARD-PID)")
    parser.add_argument("--boards", metavar="FILE.toml", help="read board profiles from this file instead")
    parser.add_argument("--net", default="loopback", metavar="PROFILE",
                        help="uplink link profile from firmware_tools/emulator/links.toml (loopback, wifi, lte-m, "
                             "kim2022); any but loopback relays the device's MQTT bytes and adds radio power")
    parser.add_argument("--relay-port", type=int, default=0, help="port on 127.0.0.1 the device connects to")
    parser.add_argument("--upstream", metavar="HOST:PORT", help="the broker the relay forwards to")
    parser.add_argument("--net-seed", type=int, default=0, help="seed of the kim2022 distance and fading")
    parser.add_argument("--net-index", type=int, default=0, help="device index for the kim2022 draw")
    parser.add_argument("--links", metavar="FILE.toml", help="read link profiles from this file instead")


def _check_ground_truth(target: Path | None) -> None:
    """Refuse a ``--ground-truth`` path the log cannot be created at, before any pty exists."""
    if target is None:
        return
    if target.is_dir():
        raise CommandError(f"--ground-truth {target} is a directory; give the CSV file to write")
    if not target.parent.is_dir():
        raise CommandError(f"--ground-truth {target}: directory {target.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"qfl meter emulate: {message}", file=sys.stderr, flush=True)

    _check_ground_truth(args.ground_truth)
    relay = None
    try:
        profile = get_link(args.net, args.links).for_device(seed=args.net_seed, index=args.net_index)
        radio = None
        if profile.emulated:
            if not args.upstream or not 1 <= args.relay_port <= 65535:
                raise CommandError(f"--net {args.net} needs --relay-port 1..65535 and --upstream HOST:PORT")
            host, _, port = args.upstream.rpartition(":")
            if not host or not port.isdigit():
                raise CommandError(f"--upstream must be HOST:PORT, got {args.upstream!r}")
            radio = RadioLog()
            relay = Relay(profile, radio, listen_port=args.relay_port, upstream=(host, int(port)))
        plan = FaultPlan(drop_rate=args.drop_rate, corrupt_rate=args.corrupt_rate,
                         unplugs=tuple(parse_window(w) for w in args.unplug),
                         overflow_bursts=tuple(parse_window(w) for w in args.overflow_burst),
                         drift_ppm=args.drift_ppm)
        emulator = MeterEmulator(pid=args.pid, link=args.link, board=args.board, seed=args.seed, rate_hz=args.rate,
                                 ground_truth=args.ground_truth, faults=plan, meter_id=args.meter_id,
                                 boards_file=args.boards, tick_seconds=args.tick_ms / 1000.0, log=say,
                                 radio=radio, radio_power_w=profile.tx_power_w)
    except (BoardError, FaultError, WatchError, EmulatorError, LinkProfileError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot listen on relay port {args.relay_port}: {exc}") from None
    if relay is not None:
        relay.start()
        say(f"link {profile.name}: {profile.rate_bps / 1e3:.1f} kbit/s, {profile.latency_s * 1e3:.1f} ms, "
            f"{profile.tx_power_w:.2f} W on air; relay :{relay.port} -> {args.upstream}")

    previous = {sig: signal.signal(sig, lambda *_: emulator.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    say(f"{emulator.board.name} meter for process {args.pid} at {args.link}")
    try:
        emulator.run()
    except LinkError as exc:
        raise CommandError(f"cannot create the emulated device at {args.link}: {exc}") from None
    except OSError as exc:
        if args.ground_truth is not None and exc.filename == str(args.ground_truth):
            raise CommandError(f"cannot write --ground-truth {args.ground_truth}: {exc.strerror or exc}") from None
        raise CommandError(f"cannot create the emulated device at {args.link}: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if relay is not None:
            relay.stop()
            say(f"radio on air {radio.busy_seconds:.3f} s for {radio.bytes_sent} bytes")
    stats = emulator.stats
    say(f"{emulator.exit_reason}; {stats.samples} samples sent, {stats.dropped_lines} dropped, "
        f"{stats.corrupted_lines} corrupted, {stats.overflow_samples} overflow, {stats.unplugs} unplugs")
    return 0
