"""The ``qfl`` command line: one entry point, subcommands loaded on demand.

Each subcommand lives in the module that owns its domain and exposes two
functions::

    def configure(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

Only the module of the subcommand being run is imported, so ``qfl edge run``
works on a device that installed the ``edge`` extra alone (no scikit-learn,
matplotlib or rich), and ``qfl --help`` imports nothing heavy at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "testbed": ("basestation.testbed.cli", "run the emulated testbed end to end and write a report"),
    "report": ("basestation.report.cli", "write the report of one or more finished runs"),
    "train": ("edge.commands.train", "train one model centrally with the fixed-point trainer"),
    "solve": ("basestation.energy.cli", "solve the precision that reaches a target for the least energy"),
    "edge": ("edge.runtime.cli", "run a device: train, meter, and publish updates over MQTT"),
    "basestation": ("basestation.cli", "run the basestation service that orchestrates rounds"),
    "broker": ("basestation.broker_cli", "run a private Mosquitto broker for a field testbed"),
    "meter": ("edge.meter.cli", "read a power meter, or emulate one for a local process"),
    "inspect": ("edge.wire.inspect_cli", "print a decoded summary of an update or model message"),
    "partition": ("edge.data.cli", "split a dataset into per-device shards (.npz)"),
    "export": ("models.cli", "export a trained global model to ONNX"),
}


class CommandError(Exception):
    """An error a command reports to the user as one line, exit status 2."""


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="qfl",
        description="qfl-testbed: quantized federated learning with measured energy.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'qfl COMMAND --help' for the options of one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run one subcommand, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    top.add_argument("--version", action="version", version=f"qfl-testbed {_version()}")
    if not argv or argv[0] not in COMMANDS:
        if argv and not argv[0].startswith("-"):
            top.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        top.parse_args(argv)
        top.print_help()
        return 2
    name = argv[0]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"qfl {name}", description=(module.__doc__ or summary).strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except CommandError as exc:
        print(f"qfl {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qfl {name}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qfl-testbed")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    # Run as ``python -m edge.cli``: this module is ``__main__``, so call the ``edge.cli`` the
    # subcommands import, or their CommandError would not be the class ``main`` catches.
    from edge.cli import main as package_main

    raise SystemExit(package_main())
