"""A pseudo-terminal standing in for the meter's USB serial port, reachable through a symlink.

    link = PtyLink("/tmp/qfl-meter0")     # /tmp/qfl-meter0 -> /dev/pts/N
    link.write(b"...")                    # what the meter sends
    text = link.read_available()          # what the host sent
    link.unplug(); link.plug()            # the device vanishes and comes back (as a new /dev/pts/M)

The slave side is put in raw mode at once (no echo, no line editing, no CR/LF
translation), so bytes pass exactly as a USB CDC port passes them, even
before a reader opens it. The link keeps its own slave descriptor open, so
the pty lives on while no reader is attached. Writes never block: what the
pty cannot take yet waits in a backlog, and past ``backlog_bytes`` the oldest
whole lines are dropped (counted in ``dropped_bytes``), like a device whose
host stops reading. It also serves as the ``port`` of the firmware's
``run()`` loop (``write``, ``read_available``, ``wait``).
"""

from __future__ import annotations

import contextlib
import os
import select
import tty
from pathlib import Path


class LinkError(OSError):
    """The symlink cannot be created where asked."""


class PtyLink:
    """One emulated serial device (see the module docstring)."""

    def __init__(self, link: str | Path, *, backlog_bytes: int = 256 * 1024):
        self.link = Path(link)
        self.backlog_bytes = backlog_bytes
        self.dropped_bytes = 0
        self.device: str | None = None
        self._master = -1
        self._slave = -1
        self._backlog = bytearray()
        if self.link.exists() and not self.link.is_symlink():
            raise LinkError(f"{self.link} exists and is not a symlink; choose another link path")
        if not self.link.parent.is_dir():
            raise LinkError(f"directory {self.link.parent} does not exist; cannot put the link {self.link} there")
        self.plug()

    @property
    def plugged(self) -> bool:
        return self._master >= 0

    def plug(self) -> None:
        """Create a fresh pty and point the link at it."""
        if self.plugged:
            return
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.device = os.ttyname(slave)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(self.device, tmp)
        os.replace(tmp, self.link)  # atomic: a reader never sees a half-made link

    def unplug(self) -> None:
        """Remove the link and close the pty: an open reader sees the device go away."""
        if not self.plugged:
            return
        with contextlib.suppress(OSError):
            if self.link.is_symlink() and os.readlink(self.link) == self.device:
                self.link.unlink()
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = -1
        self._backlog.clear()

    def close(self) -> None:
        self.unplug()

    def write(self, data: bytes | str) -> None:
        """Queue bytes for the host and send what the pty takes now; dropped silently while unplugged."""
        if not self.plugged or not data:
            return
        self._backlog += data.encode("ascii", "replace") if isinstance(data, str) else data
        self.flush()

    def flush(self) -> None:
        backlog = self._backlog
        while backlog:
            try:
                sent = os.write(self._master, backlog)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # EIO and the like: nobody can read it; keep the backlog bounded below
                break
            del backlog[:sent]
        excess = len(backlog) - self.backlog_bytes
        if excess > 0:
            cut = backlog.find(b"\n", excess)
            cut = len(backlog) if cut < 0 else cut + 1
            del backlog[:cut]
            self.dropped_bytes += cut

    def read_available(self) -> str:
        """Whatever the host has sent (possibly partial lines), without waiting."""
        if not self.plugged:
            return ""
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return ""
        except OSError:
            return ""
        return data.decode("ascii", "replace")

    def wait(self, ms: float) -> None:
        """Sleep up to ``ms`` milliseconds, waking early when the host sends something."""
        if ms <= 0:
            return
        if not self.plugged:
            select.select([], [], [], ms / 1000.0)
            return
        with contextlib.suppress(OSError, ValueError):
            select.select([self._master], [], [], ms / 1000.0)

    def __enter__(self) -> PtyLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PtyLink {str(self.link)!r} -> {self.device if self.plugged else 'unplugged'}>"
