"""What a watched process really did: CPU time and bytes written, from /proc.

    watcher = ProcessWatcher(pid)
    a = watcher.sample()        # Activity(cpu_seconds, bytes_written, alive)

CPU time is the sum over the process's threads of the first field of
``/proc/PID/task/TID/schedstat``: nanoseconds on the CPU, from the
scheduler's own accounting. ``utime + stime`` of ``/proc/PID/stat`` counts in
clock ticks (``SC_CLK_TCK``, 100 per second), so a 30 ms training phase would
read as 20 or 40 ms; the nanosecond figure lets the emulated power follow
phases that short. The time of a thread that has ended is kept at its last
reading. Kernels without schedstat (no ``CONFIG_SCHED_INFO``) fall back to the
tick counts of ``/proc/PID/stat``, which also covers every thread; children
count only once they have been reaped.

Bytes written is ``wchar`` of ``/proc/PID/io``: bytes passed to ``write()``
and its relatives, whether they went to a file, a pipe, a terminal or a
socket written with ``write()``. It is used rather than ``write_bytes``
(bytes that reached the block layer), which misses network traffic entirely
and lags file writes by the page cache. Note that ``send()``/``sendmsg()``
are not counted: Python sockets, and so paho-mqtt, transmit with ``send()``;
what the emulator sees of an uplink is what the process writes (the edge
runtime spools each update to disk before publishing it, and that write
carries the update's bytes). ``/proc/PID/io`` is readable only by the
process's owner (or root); when it is not, ``bytes_written`` is None and
``io_problem`` says why, and the emulator leaves the radio term at zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class WatchError(ProcessLookupError):
    """The process to watch does not exist (or /proc cannot be read)."""


@dataclass(frozen=True)
class Activity:
    """Cumulative figures of the watched process at one instant."""

    cpu_seconds: float
    bytes_written: int | None
    alive: bool


class ProcessWatcher:
    """Reads CPU time and bytes written of one process; keeps its /proc files open between reads."""

    def __init__(self, pid: int):
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise WatchError(f"a process id is a positive integer, got {pid!r}")
        self.pid = pid
        self._tick = float(os.sysconf("SC_CLK_TCK"))
        try:
            self._stat = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        except FileNotFoundError:
            raise WatchError(f"no process with id {pid} (nothing at /proc/{pid})") from None
        except OSError as exc:
            raise WatchError(f"cannot read /proc/{pid}/stat: {exc}") from None
        self._schedstat = os.path.exists(f"/proc/{pid}/schedstat")
        self._thread_ns: dict[str, int] = {}  # tid -> last CPU ns read (ended threads keep theirs)
        self.io_problem: str | None = None
        self._io: int | None = None
        try:
            self._io = os.open(f"/proc/{pid}/io", os.O_RDONLY)
            os.pread(self._io, 512, 0)
        except OSError as exc:
            self._close_io()
            self.io_problem = (f"cannot read /proc/{pid}/io ({exc.strerror}): it is readable only by the "
                               "process's owner or root; bytes written are not emulated (radio power 0)")

    def _close_io(self) -> None:
        if self._io is not None:
            os.close(self._io)
            self._io = None

    def sample(self) -> Activity:
        """Current cumulative CPU seconds and bytes written; ``alive`` False once the process ended."""
        try:
            stat = os.pread(self._stat, 1024, 0)
        except OSError:  # ESRCH: reaped
            return Activity(0.0, None, False)
        rpar = stat.rfind(b")")  # the command name may contain spaces and parentheses
        fields = stat[rpar + 2:].split()
        if not fields or fields[0] in (b"Z", b"X"):
            return Activity(0.0, None, False)
        cpu = self._thread_cpu_seconds()
        if cpu is None:
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
        written = None
        if self._io is not None:
            try:
                text = os.pread(self._io, 512, 0)
                start = text.index(b"wchar:") + 6
                written = int(text[start:text.index(b"\n", start)])
            except (OSError, ValueError):
                written = None
        return Activity(cpu, written, True)

    def _thread_cpu_seconds(self) -> float | None:
        """Nanosecond CPU time of all threads from schedstat, or None where the kernel has none."""
        if not self._schedstat:
            return None
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return None
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat", "rb") as fh:
                    self._thread_ns[tid] = int(fh.read().split(None, 1)[0])
            except FileNotFoundError:
                continue  # the thread ended between listdir and open: keep its last reading
            except (OSError, ValueError, IndexError):
                self._schedstat = False
                return None
        return sum(self._thread_ns.values()) / 1e9

    def close(self) -> None:
        if self._stat >= 0:
            os.close(self._stat)
            self._stat = -1
        self._close_io()

    def __enter__(self) -> ProcessWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
