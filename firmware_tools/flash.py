"""Flash the meter firmware onto a Raspberry Pi Pico that runs MicroPython, with mpremote.

    python -m firmware_tools.flash --port /dev/ttyACM0

Copies ``meter_firmware/ina219.py`` and ``meter_firmware/main.py`` to the
board's flash and resets it; the board then boots into the meter and prints
its ``#QFLM`` line. MicroPython itself must be on the board first: hold
BOOTSEL while plugging the Pico in and copy the RP2040 MicroPython ``.uf2``
onto the drive that appears. ``mpremote`` comes with the ``dev`` extra
(``pip install mpremote``). Each step runs as its own ``mpremote connect PORT
...`` so a failure names the step that failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

FIRMWARE_DIR = Path(__file__).with_name("meter_firmware")
FILES = ("ina219.py", "main.py")  # the driver first: main.py imports it at boot


class FlashError(RuntimeError):
    """Flashing cannot start or a step failed; the message says which and what to check."""


def flash_steps(port: str, mpremote: str = "mpremote") -> list[list[str]]:
    """The mpremote command lines that flash the firmware, in order."""
    steps = [[mpremote, "connect", port, "cp", str(FIRMWARE_DIR / name), f":{name}"] for name in FILES]
    steps.append([mpremote, "connect", port, "reset"])
    return steps


def find_mpremote(name: str = "mpremote") -> str | None:
    """Path of mpremote: on PATH, or in this interpreter's own bin folder (a virtualenv not activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def flash(port: str, *, mpremote: str = "mpremote", timeout: float = 60.0, echo=print) -> None:
    """Copy the firmware to the board at ``port`` and reset it; raises FlashError with the reason.

        flash("/dev/ttyACM0")
    """
    if not Path(port).exists():
        raise FlashError(f"no device at {port}: is the Pico plugged in and running MicroPython? "
                         "(ls /dev/ttyACM*; a Pico in BOOTSEL mode shows up as a drive, not a serial port)")
    executable = find_mpremote(mpremote)
    if executable is None:
        raise FlashError(f"{mpremote!r} not found on PATH or beside {sys.executable}: install it with 'pip install mpremote' "
                         "(it is part of the dev extra: pip install -e '.[dev]')")
    for step in flash_steps(port, executable):
        shown = " ".join(step)
        echo(shown)
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FlashError(f"'{shown}' did not finish within {timeout:.0f} s: is the board busy or "
                             "not running MicroPython?") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise FlashError(f"'{shown}' failed (exit {done.returncode}): {detail[-1] if detail else 'no output'}. "
                             "Is MicroPython on the board, and is no other program (a PowerMeter, a terminal) "
                             f"holding {port}?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_tools.flash", description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="serial device of the Pico, e.g. /dev/ttyACM0")
    parser.add_argument("--mpremote", default="mpremote", help="mpremote executable")
    args = parser.parse_args(argv)
    try:
        flash(args.port, mpremote=args.mpremote)
    except FlashError as exc:
        print(f"flash: error: {exc}", file=sys.stderr)
        return 2
    print(f"flashed {', '.join(FILES)} to {args.port}; the board restarts into the meter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
