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

from edge.cli import CommandError
from firmware_tools.emulator import (BoardError, EmulatorError, FaultError, FaultPlan, MeterEmulator, WatchError,
                                     parse_window)
from firmware_tools.emulator.link import LinkProfileError, RadioLog, Relay, get_link
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
    parser.add_argument("--net", default="loopback", metavar="PROFILE",
                        help="uplink link profile from firmware_tools/emulator/links.toml (loopback, wifi, lte-m, "
                             "kim2022); any but loopback relays the device's MQTT bytes and adds radio power")
    parser.add_argument("--relay-port", type=int, default=0, help="port on 127.0.0.1 the device connects to")
    parser.add_argument("--upstream", metavar="HOST:PORT", help="the broker the relay forwards to")
    parser.add_argument("--net-seed", type=int, default=0, help="seed of the kim2022 distance and fading")
    parser.add_argument("--net-index", type=int, default=0, help="device index for the kim2022 draw")
    parser.add_argument("--links", metavar="FILE.toml", help="read link profiles from this file instead")


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"qfl meter emulate: {message}", file=sys.stderr, flush=True)

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
    except (LinkError, OSError) as exc:
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
