"""Run the basestation service that orchestrates rounds (``qfl basestation serve --config basestation.toml``).

Creates the experiment in its SQLite store or resumes it, waits for devices,
runs rounds over MQTT until ``rounds`` rounds are aggregated (then exits 0
after writing the final status) or until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys

from edge.cli import HelpFormatter


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` action and its options."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="run (or resume) the experiment of a basestation.toml",
                               description="Run (or resume) the experiment of a basestation.toml: wait for "
                                           "devices, run rounds over MQTT, store everything in SQLite.",
                               formatter_class=HelpFormatter)
    serve.add_argument("--config", required=True, help="the experiment's basestation.toml")
    serve.add_argument("--rounds", type=int, default=None,
                       help="stop after this many aggregated rounds (overrides 'rounds' in the config; 0 = no limit)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="how much to log to stderr")


def run(args: argparse.Namespace) -> int:
    """Load the config and run the service."""
    from basestation.config import BasestationConfig, ConfigError
    from firmware_tools.credentials import CredentialsError
    from basestation.service import Basestation, ServiceError
    from basestation.store import StoreError
    from edge.cli import CommandError
    from edge.mqtt import MqttError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.config:
        raise CommandError("--config needs the path of a basestation.toml")
    if args.rounds is not None and args.rounds < 0:
        raise CommandError(f"--rounds must be 0 or more, got {args.rounds}")
    try:
        config = BasestationConfig.load(args.config)
        station = Basestation(config, rounds=args.rounds)
    except (ConfigError, CredentialsError, StoreError, ServiceError, MqttError) as exc:
        raise CommandError(str(exc)) from None

    def stop(signum: int, frame: object) -> None:
        station.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return station.run()
    except (StoreError, ServiceError, MqttError, ValueError) as exc:
        raise CommandError(f"experiment {config.experiment}: {exc}") from None
    except (sqlite3.Error, OSError) as exc:  # the store stopped taking writes (read-only, disk full, ...)
        raise CommandError(f"experiment {config.experiment}: the store {config.store} failed: "
                           f"{type(exc).__name__}: {exc}; nothing after the last commit was acknowledged") from None
