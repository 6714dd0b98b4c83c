"""Stops a testbed's children when the testbed dies without stopping them (SIGKILL, the OOM killer).

The testbed starts this file as a script of its own (``python orphan_guard.py``,
which imports nothing of the project, so it costs a bare interpreter) and
writes one line per child process group on its stdin::

    +PGID     watch this process group
    -PGID     forget it (the testbed stopped it)
    done      the testbed stopped everything itself: exit quietly

If stdin reaches its end without ``done``, the testbed is gone: the guard
sends SIGTERM to every group it still watches, newest first (edges before the
basestation before the broker, as the testbed itself stops them), waits up to
``GRACE_SECONDS`` for them to exit, and kills what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

GRACE_SECONDS = 10.0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already, or not ours
        os.killpg(pgid, sig)


def stop_groups(groups: list[int], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM each group (newest first), wait up to ``grace`` s for all to exit, then SIGKILL the rest."""
    for pgid in reversed(groups):
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in groups:
        _signal(pgid, signal.SIGKILL)


def main() -> int:
    """Read commands from stdin until ``done`` (exit 0) or its end (stop every watched group, exit 1)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the testbed's to handle, not ours
    groups: list[int] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            return 0
        if command[:1] in "+-" and command[1:].isdigit():
            pgid = int(command[1:])
            if command[0] == "+":
                groups.append(pgid)
            elif pgid in groups:
                groups.remove(pgid)
    stop_groups(groups)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
