"""Run a device: train, meter, and publish updates over MQTT (``qfl edge run --config device.toml``).

The device connects to the broker in its config, waits for round plans, and
takes part whenever the basestation selects it, until SIGTERM/SIGINT or the
end of the experiment. Without ``meter_port`` in the config it runs without a
power meter and reports ``"meter": null``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``qfl edge run``."""
    parser.add_argument("--config", required=True, help="the device's device.toml")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to log to stderr")


def run(args: argparse.Namespace) -> int:
    """Load the config and run the device until it is stopped or the experiment ends."""
    from edge.cli import CommandError
    from edge.mqtt import MqttError
    from edge.runtime.config import ConfigError, DeviceConfig
    from edge.runtime.device import EdgeRuntime
    from edge.runtime.spool import SpoolError

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = DeviceConfig.load(args.config)
        runtime = EdgeRuntime(config)
    except (ConfigError, MqttError, SpoolError) as exc:
        raise CommandError(str(exc)) from None

    def stop(signum: int, frame: object) -> None:
        runtime.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from edge.meter import MeterError

    try:
        return runtime.run()
    except (MqttError, SpoolError, MeterError, OSError, ValueError) as exc:
        raise CommandError(f"device {config.device_id}: {exc}") from None
