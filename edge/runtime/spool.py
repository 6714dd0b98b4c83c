"""A disk spool of messages the basestation has not acknowledged yet, and the device's small state file.

Each message is one file, written atomically (temporary file, fsync, rename,
fsync of the directory), so after a power cut a message is either wholly
there or absent. The device re-publishes every spooled message on each
connect and deletes one when the basestation's ack names its nonce::

    spool = Spool("spool")
    spool.put(kind="update", round_=3, nonce="ab12...", topic="qfl/e/device/d/update", payload=data)
    for entry in spool.entries():            # oldest first
        publish(entry.topic, entry.payload)
    spool.remove("ab12...")

File layout: ``<seq>-<kind>-r<round>-<nonce>.msg`` holding one JSON header
line (topic, kind, round, nonce, created) followed by the raw payload.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("qfl.edge.spool")
_ENTRY = re.compile(r"^(\d{10})-(update|energy)-r(\d+)-([0-9a-f]{1,64})\.msg$")


class SpoolError(OSError):
    """The spool directory cannot be written."""


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled message."""

    seq: int
    kind: str
    round: int
    nonce: str
    topic: str
    payload: bytes
    created: float
    path: Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Unacknowledged messages on disk (see the module docstring).

    At most ``max_entries`` are kept: when full, the oldest is dropped with a
    warning, so a device that never hears back cannot fill its SD card.
    """

    def __init__(self, directory: str | Path, max_entries: int = 256):
        self.directory = Path(directory)
        self.max_entries = max_entries
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".*.tmp"):  # left by a crash mid-write
                stale.unlink()
        except OSError as exc:
            raise SpoolError(f"cannot use spool directory {self.directory}: {exc}") from exc
        self._seq = max((seq for seq, *_ in self._scan()), default=0)

    def _scan(self) -> list[tuple[int, str, int, str, Path]]:
        out = []
        for path in self.directory.iterdir():
            m = _ENTRY.match(path.name)
            if m:
                out.append((int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), path))
        out.sort()
        return out

    def put(self, *, kind: str, round_: int, nonce: str, topic: str, payload: bytes) -> SpoolEntry:
        """Store one message durably and return its entry."""
        if not re.fullmatch(r"[0-9a-f]{1,64}", nonce) or kind not in ("update", "energy"):
            raise ValueError(f"spool needs kind 'update'/'energy' and a hex nonce, got {kind!r}, {nonce!r}")
        existing = self._scan()
        while len(existing) >= self.max_entries:
            oldest = existing.pop(0)
            log.warning("spool full (%d entries): dropping the oldest, %s", self.max_entries, oldest[4].name)
            oldest[4].unlink(missing_ok=True)
        self._seq += 1
        created = time.time()
        header = json.dumps({"topic": topic, "kind": kind, "round": int(round_), "nonce": nonce,
                             "created": created}).encode() + b"\n"
        path = self.directory / f"{self._seq:010d}-{kind}-r{int(round_)}-{nonce}.msg"
        try:
            write_atomic(path, header + bytes(payload))
        except OSError as exc:
            raise SpoolError(f"cannot write {path}: {exc}") from exc
        return SpoolEntry(self._seq, kind, int(round_), nonce, topic, bytes(payload), created, path)

    def entries(self) -> list[SpoolEntry]:
        """Every spooled message, oldest first (unreadable files are skipped with a warning)."""
        out = []
        for seq, kind, round_, nonce, path in self._scan():
            try:
                raw = path.read_bytes()
                head, _, payload = raw.partition(b"\n")
                header = json.loads(head)
                out.append(SpoolEntry(seq, kind, round_, nonce, str(header["topic"]), payload,
                                      float(header["created"]), path))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping unreadable spool file %s: %s", path, exc)
        return out

    def remove(self, nonce: str) -> bool:
        """Delete the entry with this nonce; False if there is none."""
        removed = False
        for _, _, _, entry_nonce, path in self._scan():
            if entry_nonce == nonce:
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            _fsync_dir(self.directory)
        return removed

    def __len__(self) -> int:
        return len(self._scan())

    # ---- the device's own small state ----
    @property
    def _state_path(self) -> Path:
        return self.directory / "state.json"

    def load_state(self) -> dict[str, Any]:
        """The saved state dict (empty if none or unreadable)."""
        try:
            doc = json.loads(self._state_path.read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        """Save the state dict atomically."""
        write_atomic(self._state_path, json.dumps(state, sort_keys=True).encode())
