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
import os
import sys
from pathlib import Path

# name -> (module, one-line help), or name -> {action: (module, one-line help)} for a command whose
# actions live in different layers ('meter read' runs on a device, 'meter emulate' needs the emulator).
# Order is the order shown in --help.
Entry = tuple[str, str]
COMMANDS: dict[str, Entry | dict[str, Entry]] = {
    "testbed": ("basestation.testbed.cli", "run the emulated testbed end to end and write a report"),
    "sweep": ("basestation.sweep.cli", "run every fixed (n, m, I) of a grid and the policies; regret and saving"),
    "report": ("basestation.report.cli", "write the report of one or more finished runs"),
    "train": ("edge.commands.train", "train one model centrally with the fixed-point trainer"),
    "solve": ("basestation.energy.cli", "solve the precision that reaches a target for the least energy"),
    "edge": {
        "run": ("edge.runtime.cli", "run a device: train, meter, and publish updates over MQTT"),
        "infer": ("edge.infer.cli", "run an exported model (.tflite or .onnx) on inputs from an .npz file"),
    },
    "basestation": ("basestation.cli", "run the basestation service that orchestrates rounds"),
    "broker": ("basestation.broker_cli", "run a private Mosquitto broker for a field testbed"),
    "meter": {
        "read": ("edge.meter.cli", "live readout and an energy summary from a meter"),
        "emulate": ("firmware_tools.emulator.cli", "emulate a meter for a running process on a pseudo-terminal"),
        "fleet": ("firmware_tools.emulator.fleet_cli", "emulate the meters of many processes in one process"),
    },
    "inspect": ("edge.wire.inspect_cli", "print a decoded summary of an update or model message"),
    "partition": ("edge.data.cli", "split a dataset into per-device shards (.npz)"),
    "export": ("basestation.export_cli", "export a trained global model to ONNX or TFLite"),
}
GROUP_HELP = {"meter": "read a power meter, or emulate one for a local process",
              "edge": "run a device in an experiment, or run an exported model on it"}


class CommandError(Exception):
    """An error a command reports to the user as one line, exit status 2."""


def seed(text: str) -> int:
    """An argparse type for a random seed: an integer 0..2**32 - 1, as numpy's generators take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed must be 0..{2**32 - 1}, got {value}")
    return value


def given_path(text: str) -> Path:
    """An argparse type for a path: refuses the empty string, which would silently mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing; give a file or folder")
    return Path(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless its help already speaks of one or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action) or text


def _description(module_doc: str | None, summary: str) -> str:
    """The first line of a command module's docstring, without its reStructuredText literal quotes."""
    return (module_doc or summary).strip().splitlines()[0].replace("``", "'")


def _summary(name: str) -> str:
    entry = COMMANDS[name]
    return GROUP_HELP[name] if isinstance(entry, dict) else entry[1]


def _listing_parser(prog: str, description: str, entries: dict[str, str], hint: str) -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {summary}" for name, summary in entries.items()]
    return argparse.ArgumentParser(
        prog=prog, description=description, usage=f"{prog} [-h] {'COMMAND' if prog == 'qfl' else 'ACTION'} ...",
        epilog="commands:\n" + "\n".join(lines) + f"\n\n{hint}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _pick(prog: str, description: str, table: dict[str, str], argv: list[str], hint: str,
          version: bool = False) -> str | None:
    """The command named by ``argv[0]`` if it is in ``table``; otherwise print help or an error, return None."""
    parser = _listing_parser(prog, description, table, hint)
    if version:
        parser.add_argument("--version", action="version", version=f"qfl-testbed {_version()}")
    if argv and argv[0] in table:
        return argv[0]
    if argv and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(table)}")
    parser.parse_args(argv)
    parser.print_help()
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run one subcommand, return its exit status."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C before the subcommand runs: importing a command's module (numpy, matplotlib) can
        # take a noticeable fraction of a second, and a traceback is no answer to an interrupt.
        print("qfl: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    name = _pick("qfl", "qfl-testbed: quantized federated learning with measured energy.",
                 {n: _summary(n) for n in COMMANDS}, argv, "Run 'qfl COMMAND --help' for the options of one command.",
                 version=True)
    if name is None:
        return 2
    entry, prog, rest = COMMANDS[name], f"qfl {name}", argv[1:]
    if isinstance(entry, dict):
        action = _pick(prog, GROUP_HELP[name], {a: e[1] for a, e in entry.items()}, rest,
                       f"Run '{prog} ACTION --help' for the options of one action.")
        if action is None:
            return 2
        entry, prog, rest = entry[action], f"{prog} {action}", rest[1:]
    module_name, summary = entry
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=_description(module.__doc__, summary),
                                     formatter_class=HelpFormatter)
    module.configure(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except CommandError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`qfl ... --json | head`): nothing left to say, and Python
        # would print another error when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A path the user gave that cannot be used (a file where a folder belongs, a folder where a
        # file belongs, no permission): the system's own words and the path, on one line.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


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
