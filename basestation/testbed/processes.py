"""Child processes of a testbed run: started with their own log, stopped for sure.

    with Supervisor() as children:
        edge = children.start("edge-0", ["qfl", "edge", "run", ...], log=run / "logs" / "edge-0.log")
        ...
    # on leaving the block, every child still running gets SIGTERM, then SIGKILL

Each child runs in its own session (process group), so a Ctrl-C typed in the
terminal reaches only the testbed, which then stops the children in order
instead of all of them dying at once mid-write. A Ctrl-C that arrives while a
child is being started waits until the child is on the list, so no child is
left out of the stop. And if the testbed itself dies without stopping them
(SIGKILL, the OOM killer), a guard process (``orphan_guard.py``) that watches
every child's group stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

_GUARD_SCRIPT = Path(__file__).with_name("orphan_guard.py")


@dataclass
class Child:
    """A started child process and where its output goes."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        """Last ``lines`` lines of the child's log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Starts children and stops every one of them (process group included) on close."""

    env: dict[str, str] | None = None
    children: list[Child] = field(default_factory=list)
    _guard: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, name: str, argv: Sequence[str], *, log: Path, cwd: Path | None = None) -> Child:
        """Start ``argv`` with stdout and stderr appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with deferred_interrupts(), open(log, "ab") as out:
            process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=cwd, env=self.env, start_new_session=True)
            child = Child(name, process, log)
            self.children.append(child)
            self.guard(process.pid)
        return child

    def guard(self, pgid: int) -> None:
        """Have the orphan guard stop process group ``pgid`` should this process die first."""
        if self._guard is None:
            self._guard = subprocess.Popen([sys.executable, str(_GUARD_SCRIPT)], stdin=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True, text=True)
        _tell(self._guard.stdin, f"+{pgid}")

    def stop(self, child: Child, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal ``child``'s process group, wait up to ``timeout`` s, then kill it; returns its exit code."""
        if child.running():
            _signal_group(child.pid, sig)
            try:
                child.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.process.wait()
        # The group may hold grandchildren that outlive the leader.
        _signal_group(child.pid, signal.SIGKILL)
        if self._guard is not None:  # stopped: the guard must not signal a group id the system may reuse
            _tell(self._guard.stdin, f"-{child.pid}")
        return child.process.returncode

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop every child, newest first (edges before the basestation before the broker), then the guard."""
        for child in reversed(self.children):
            self.stop(child, timeout=timeout)
        if self._guard is not None:
            _tell(self._guard.stdin, "done")
            with contextlib.suppress(OSError):
                self._guard.stdin.close()
            self._guard.wait()
            self._guard = None

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tell(stream: IO[str] | None, line: str) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError):  # a guard that is gone has nothing left to do
        stream.write(line + "\n")
        stream.flush()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on the first one that came.

    Around starting a process and recording it, so an interrupt cannot fall
    between the two and leave a child nobody stops. Outside the main thread
    (where Python cannot set handlers) the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(held[0])


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_for(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate()`` until it is true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
