"""The experiment store: one SQLite file in WAL mode, versioned by PRAGMA user_version.

Everything the basestation learns lives here, so a basestation killed at any
moment restarts from it: experiments, devices, rounds and their plans, the
global model of every round, received updates (metadata, and the payload while
its round is open), rejections with reasons, energy reports and their phases,
calibration fits, policy decisions and evaluations::

    store = Store("runs/exp1.sqlite")
    with store.transaction():
        store.create_experiment("exp1", {"model": "mlp"})
        store.save_model("exp1", 1, "ab12...", weights)
    for r in store.rounds("exp1"):
        print(r.round, r.status, r.accuracy)
    store.close()

Update payloads (100 kB each for a 100,000-parameter model) do not go
through SQLite: they are appended to one file per open round beside the
store (``<store>.payloads/<experiment>-r<round>.log``), fsynced before the
transaction that records their offsets commits, and deleted when the round
closes (unless kept). That halves the bytes written per update and keeps
the WAL small.

Writes outside ``with store.transaction()`` commit one statement at a time;
inside, the block commits (or rolls back) as a whole, which is how the
basestation batches many updates into one durable commit before it
acknowledges them. ``synchronous="full"`` (default) makes every commit survive
a power cut, ``"normal"`` only a crash of the process.

The query methods (:meth:`rounds`, :meth:`energy`, :meth:`decisions`, ...)
return small frozen dataclasses, the interface the reports build on.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE experiments (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    final TEXT
);
CREATE TABLE devices (
    experiment TEXT NOT NULL REFERENCES experiments(id),
    device TEXT NOT NULL,
    dataset_size INTEGER,
    board TEXT,
    meter_id TEXT,
    software TEXT,
    hello TEXT,
    state TEXT NOT NULL DEFAULT 'unknown',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (experiment, device)
);
CREATE TABLE rounds (
    experiment TEXT NOT NULL REFERENCES experiments(id),
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL,
    selected TEXT NOT NULL,
    n INTEGER NOT NULL,
    m INTEGER NOT NULL,
    deadline REAL NOT NULL,
    quorum INTEGER NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    model_hash TEXT NOT NULL,
    result_hash TEXT,
    accepted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment, round)
);
CREATE TABLE plans (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    version INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    plan TEXT NOT NULL,
    PRIMARY KEY (experiment, round, version)
);
CREATE TABLE models (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    weights BLOB NOT NULL,
    PRIMARY KEY (experiment, round)
);
CREATE TABLE updates (
    experiment TEXT NOT NULL,
    device TEXT NOT NULL,
    round INTEGER NOT NULL,
    nonce TEXT NOT NULL,
    digest TEXT NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    m INTEGER,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,
    payload_offset INTEGER,
    payload_size INTEGER,
    PRIMARY KEY (experiment, nonce),
    UNIQUE (experiment, device, round)
);
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    device TEXT,
    round INTEGER,
    detail TEXT
);
CREATE INDEX rejections_by_reason ON rejections (experiment, reason);
CREATE TABLE energy_reports (
    experiment TEXT NOT NULL,
    device TEXT NOT NULL,
    round INTEGER NOT NULL,
    nonce TEXT NOT NULL,
    received_at REAL NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (experiment, device, round)
);
CREATE TABLE energy_phases (
    experiment TEXT NOT NULL,
    device TEXT NOT NULL,
    round INTEGER NOT NULL,
    phase TEXT NOT NULL,
    joules REAL,
    joules_above_idle REAL,
    seconds REAL,
    samples INTEGER,
    gap_seconds REAL,
    partial INTEGER,
    uncertainty_j REAL,
    PRIMARY KEY (experiment, device, round, phase)
);
CREATE TABLE calibrations (
    id INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    fitted_at REAL NOT NULL,
    fit TEXT NOT NULL
);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    decided_at REAL NOT NULL,
    policy TEXT NOT NULL,
    n INTEGER NOT NULL,
    m INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    detail TEXT
);
CREATE TABLE evaluations (
    experiment TEXT NOT NULL,
    round INTEGER NOT NULL,
    evaluated_at REAL NOT NULL,
    loss REAL NOT NULL,
    accuracy REAL NOT NULL,
    samples INTEGER NOT NULL,
    model_hash TEXT NOT NULL,
    PRIMARY KEY (experiment, round)
);
"""

ROUND_STATES = ("open", "aggregated", "abandoned")
UPDATE_STATES = ("accepted", "aggregated", "unused", "dropped")
_PHASE_FIELDS = ("joules", "joules_above_idle", "seconds", "samples", "gap_seconds", "partial", "uncertainty_j")


class StoreError(RuntimeError):
    """The store file cannot be used (newer schema, not a qfl store, unknown experiment)."""


# ---- records returned by the query methods ----

@dataclass(frozen=True)
class ExperimentRecord:
    """One experiment: its config (as created), status and final status document."""

    id: str
    created_at: float
    updated_at: float
    config: dict[str, Any]
    status: str
    final: dict[str, Any] | None


@dataclass(frozen=True)
class DeviceRecord:
    """A device as registered from its hello, with its last known online state."""

    device: str
    dataset_size: int | None
    board: str | None
    meter_id: str | None
    software: str | None
    state: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class RoundRecord:
    """One round with its plan summary and, once aggregated, its evaluation."""

    round: int
    status: str
    opened_at: float
    closed_at: float | None
    selected: tuple[str, ...]
    n: int
    m: int
    deadline: float
    quorum: int
    extensions: int
    model_hash: str
    result_hash: str | None
    accepted: int
    loss: float | None
    accuracy: float | None


@dataclass(frozen=True)
class UpdateRecord:
    """Metadata of one accepted update (payload via :meth:`Store.update_payloads`)."""

    device: str
    round: int
    nonce: str
    digest: str
    samples: int
    bytes: int
    m: int | None
    received_at: float
    status: str
    has_payload: bool


@dataclass(frozen=True)
class EnergyRecord:
    """One phase of one device's energy report for one round."""

    device: str
    round: int
    phase: str
    joules: float | None
    joules_above_idle: float | None
    seconds: float | None
    samples: int | None
    gap_seconds: float | None
    partial: bool | None
    uncertainty_j: float | None


@dataclass(frozen=True)
class DecisionRecord:
    """A precision decision: the policy, the chosen (n, m), and everything it was given."""

    round: int
    decided_at: float
    policy: str
    n: int
    m: int
    inputs: dict[str, Any]
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class RejectionRecord:
    """A message the basestation refused, and why."""

    received_at: float
    kind: str
    reason: str
    device: str | None
    round: int | None
    detail: str | None


def weights_to_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays (an ``.npz`` image, no pickles)."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(value) for name, value in weights.items()})
    return buf.getvalue()


def weights_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_bytes`, keeping the names' order."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Store:
    """The SQLite store of one basestation (see the module docstring)."""

    def __init__(self, path: str | Path, *, synchronous: str = "full", readonly: bool = False):
        """Open (creating or migrating) the store at ``path``.

        ``readonly=True`` is for readers beside a running basestation (progress
        display, reports, export): the file must exist, nothing is migrated and
        no payload log is touched, so a reader can never disturb the writer.
        """
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no store at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=10.0,
                                       check_same_thread=False)
            self._depth = 0
            self.payload_dir = self.path.with_name(self.path.name + ".payloads")
            self._logs, self._unsynced, self._unlink_after_commit = {}, set(), []
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                self._db.close()
                raise StoreError(f"{self.path} is not a usable qfl store: {exc}") from None
            if version != SCHEMA_VERSION:
                self._db.close()
                raise StoreError(f"{self.path} has schema version {version}, this qfl-testbed reads "
                                 f"{SCHEMA_VERSION}" if version else f"{self.path} is not a qfl store (or "
                                 "one whose basestation has not created its tables yet)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread at a time, but not necessarily the one that opened it (a service built in one
        # thread and run in another).
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0, check_same_thread=False)
        self._depth = 0
        self.payload_dir = self.path.with_name(self.path.name + ".payloads")
        self._logs: dict[tuple[str, int], int] = {}  # open payload logs: (experiment, round) -> fd
        self._unsynced: set[int] = set()
        self._unlink_after_commit: list[Path] = []
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path} is not a usable qfl store: {exc}") from None
        except StoreError:
            self._db.close()
            raise
        self._remove_orphan_logs()

    def _migrate(self) -> None:
        # Under the write lock, so two processes opening a new file do not both create the schema.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}; this qfl-testbed reads up to "
                                 f"{SCHEMA_VERSION}: upgrade qfl-testbed")
            if version == 0:
                tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if tables:
                    raise StoreError(f"{self.path} is an SQLite file with other tables, not a qfl store")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- transactions ----
    @contextmanager
    def transaction(self) -> Iterator["Store"]:
        """Group writes into one commit; nested blocks join the outer one."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
                self._unlink_after_commit.clear()
            raise
        self._depth -= 1
        if self._depth == 0:
            self._sync_payloads()  # payload bytes are on disk before the rows that point at them
            self._db.execute("COMMIT")
            self._after_commit()

    @contextmanager
    def savepoint(self) -> Iterator["Store"]:
        """Inside a transaction: undo only this block's writes if it raises (the transaction goes on)."""
        if self._depth == 0:
            raise StoreError("savepoint() needs an open transaction (with store.transaction(): ...)")
        self._db.execute("SAVEPOINT block")
        try:
            yield self
        except BaseException:
            self._db.execute("ROLLBACK TO block")
            self._db.execute("RELEASE block")
            raise
        self._db.execute("RELEASE block")

    def _sync_payloads(self) -> None:
        for fd in self._unsynced:
            os.fsync(fd)
        self._unsynced.clear()

    def _after_commit(self) -> None:
        for path in self._unlink_after_commit:
            path.unlink(missing_ok=True)
        self._unlink_after_commit.clear()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file now (between rounds, off the ingest path)."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Close the file (safe twice)."""
        for fd in self._logs.values():
            os.close(fd)
        self._logs.clear()
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    # ---- payload logs ----
    def _log_path(self, experiment: str, round_: int) -> Path:
        return self.payload_dir / f"{experiment}-r{int(round_)}.log"

    def _log_fd(self, experiment: str, round_: int) -> int:
        fd = self._logs.get((experiment, round_))
        if fd is None:
            self.payload_dir.mkdir(exist_ok=True)
            fd = os.open(self._log_path(experiment, round_), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self._logs[(experiment, round_)] = fd
        return fd

    def _append_payload(self, experiment: str, round_: int, payload: bytes) -> int:
        """Append to the round's log; returns the offset. Synced before the next commit."""
        fd = self._log_fd(experiment, round_)
        offset = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        self._unsynced.add(fd)
        return offset

    def _read_payload(self, experiment: str, round_: int, offset: int, size: int) -> bytes:
        data = os.pread(self._log_fd(experiment, round_), size, offset)
        if len(data) != size:
            raise StoreError(f"payload log {self._log_path(experiment, round_)} is shorter than the store expects")
        return data

    def _drop_log(self, experiment: str, round_: int) -> None:
        fd = self._logs.pop((experiment, round_), None)
        if fd is not None:
            os.close(fd)
        self._unlink_after_commit.append(self._log_path(experiment, round_))
        if self._depth == 0:
            self._after_commit()

    def _remove_orphan_logs(self) -> None:
        """Delete logs no row points at (left by a crash between a round's commit and the unlink)."""
        if not self.payload_dir.is_dir():
            return
        live = {f"{e}-r{r}.log" for e, r in self._db.execute(
            "SELECT DISTINCT experiment, round FROM updates WHERE payload_size IS NOT NULL")}
        for path in self.payload_dir.glob("*.log"):
            if path.name not in live:
                path.unlink(missing_ok=True)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {str(self.path)!r} schema v{SCHEMA_VERSION}>"

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._db.execute(sql, args).fetchone()

    # ---- experiments ----
    def create_experiment(self, experiment: str, config: Mapping[str, Any], *, now: float | None = None) -> None:
        """Record a new experiment; StoreError if the id exists."""
        now = time.time() if now is None else now
        try:
            self._db.execute("INSERT INTO experiments (id, created_at, updated_at, config, status) VALUES (?,?,?,?,?)",
                             (experiment, now, now, _json(dict(config)), "running"))
        except sqlite3.IntegrityError:
            raise StoreError(f"experiment {experiment!r} already exists in {self.path}") from None

    def experiment(self, experiment: str) -> ExperimentRecord | None:
        """The experiment, or None if the store does not have it."""
        row = self._one("SELECT id, created_at, updated_at, config, status, final FROM experiments WHERE id=?",
                        (experiment,))
        if row is None:
            return None
        return ExperimentRecord(row[0], row[1], row[2], json.loads(row[3]), row[4],
                                json.loads(row[5]) if row[5] else None)

    def experiments(self) -> list[ExperimentRecord]:
        """Every experiment, oldest first."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM experiments ORDER BY created_at, id")]
        return [rec for rec in (self.experiment(i) for i in ids) if rec is not None]

    def set_experiment_status(self, experiment: str, status: str, final: Mapping[str, Any] | None = None,
                              *, now: float | None = None) -> None:
        """Set ``running``/``finished``/``stopped`` and, optionally, the final status document."""
        now = time.time() if now is None else now
        cur = self._db.execute("UPDATE experiments SET status=?, final=?, updated_at=? WHERE id=?",
                               (status, _json(dict(final)) if final is not None else None, now, experiment))
        if cur.rowcount == 0:
            raise StoreError(f"no experiment {experiment!r} in {self.path}")

    # ---- devices ----
    def register_device(self, experiment: str, device: str, hello: Mapping[str, Any], *, now: float | None = None) -> None:
        """Insert or refresh a device from its hello message.

        The first declared ``dataset_size`` stays: it bounds the samples the
        device may claim (basestation.bounds), so a later hello cannot raise it.
        """
        now = time.time() if now is None else now
        size = hello.get("dataset_size")
        self._db.execute(
            "INSERT INTO devices (experiment, device, dataset_size, board, meter_id, software, hello, state, first_seen,"
            " last_seen) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (experiment, device) DO UPDATE SET"
            " dataset_size=COALESCE(devices.dataset_size, excluded.dataset_size), board=excluded.board, meter_id=excluded.meter_id,"
            " software=excluded.software, hello=excluded.hello, last_seen=excluded.last_seen",
            (experiment, device, int(size) if size is not None else None, _opt_str(hello.get("board")),
             _opt_str(hello.get("meter_id")), _opt_str(hello.get("software")), _json(dict(hello)), "unknown", now, now))

    def set_device_state(self, experiment: str, device: str, state: str, *, now: float | None = None) -> bool:
        """Record ``online``/``offline`` for a registered device; False if it is not registered."""
        now = time.time() if now is None else now
        cur = self._db.execute("UPDATE devices SET state=?, last_seen=? WHERE experiment=? AND device=?",
                               (state, now, experiment, device))
        return cur.rowcount > 0

    def devices(self, experiment: str) -> list[DeviceRecord]:
        """Registered devices of the experiment, by id."""
        rows = self._db.execute("SELECT device, dataset_size, board, meter_id, software, state, first_seen, last_seen"
                                " FROM devices WHERE experiment=? ORDER BY device", (experiment,))
        return [DeviceRecord(*row) for row in rows]

    # ---- models ----
    def save_model(self, experiment: str, round_: int, model_hash: str, weights: Mapping[str, np.ndarray],
                   *, now: float | None = None) -> None:
        """Store the global model that round ``round_`` starts from (replaces an earlier one)."""
        now = time.time() if now is None else now
        self._db.execute("INSERT OR REPLACE INTO models (experiment, round, hash, created_at, weights) VALUES (?,?,?,?,?)",
                         (experiment, round_, model_hash, now, weights_to_bytes(weights)))

    def model(self, experiment: str, round_: int) -> tuple[str, dict[str, np.ndarray]] | None:
        """(hash, weights) of the model round ``round_`` starts from, or None."""
        row = self._one("SELECT hash, weights FROM models WHERE experiment=? AND round=?", (experiment, round_))
        return None if row is None else (row[0], weights_from_bytes(row[1]))

    def latest_model(self, experiment: str) -> tuple[int, str, dict[str, np.ndarray]] | None:
        """(round, hash, weights) of the newest stored global model, or None."""
        row = self._one("SELECT round, hash, weights FROM models WHERE experiment=? ORDER BY round DESC LIMIT 1",
                        (experiment,))
        return None if row is None else (row[0], row[1], weights_from_bytes(row[2]))

    # ---- rounds and plans ----
    def open_round(self, experiment: str, round_: int, *, selected: list[str], n: int, m: int, deadline: float,
                   quorum: int, model_hash: str, plan: Mapping[str, Any], now: float | None = None) -> None:
        """Record a new open round and its first plan."""
        now = time.time() if now is None else now
        self._db.execute("INSERT INTO rounds (experiment, round, status, opened_at, selected, n, m, deadline, quorum,"
                         " model_hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (experiment, round_, "open", now, _json(list(selected)), n, m, deadline, quorum, model_hash))
        self.add_plan(experiment, round_, plan, now=now)

    def extend_round(self, experiment: str, round_: int, deadline: float, plan: Mapping[str, Any],
                     *, now: float | None = None) -> None:
        """Move an open round's deadline and record the re-issued plan."""
        self._db.execute("UPDATE rounds SET deadline=?, extensions=extensions+1 WHERE experiment=? AND round=?",
                         (deadline, experiment, round_))
        self.add_plan(experiment, round_, plan, now=now)

    def add_plan(self, experiment: str, round_: int, plan: Mapping[str, Any], *, now: float | None = None) -> None:
        """Append a version of a round's plan."""
        now = time.time() if now is None else now
        version = self._one("SELECT coalesce(max(version), 0) + 1 FROM plans WHERE experiment=? AND round=?",
                            (experiment, round_))[0]
        self._db.execute("INSERT INTO plans (experiment, round, version, issued_at, plan) VALUES (?,?,?,?,?)",
                         (experiment, round_, version, now, _json(dict(plan))))

    def plan(self, experiment: str, round_: int) -> dict[str, Any] | None:
        """The latest version of a round's plan, or None."""
        row = self._one("SELECT plan FROM plans WHERE experiment=? AND round=? ORDER BY version DESC LIMIT 1",
                        (experiment, round_))
        return None if row is None else json.loads(row[0])

    def close_round(self, experiment: str, round_: int, status: str, *, result_hash: str | None = None,
                    drop_payloads: bool = True, now: float | None = None) -> None:
        """Mark a round ``aggregated`` (with the new model's hash) or ``abandoned``.

        Its accepted updates become ``aggregated`` (or ``unused``); their
        payloads are dropped unless ``drop_payloads`` is False. The metadata stays.
        """
        if status not in ROUND_STATES[1:]:
            raise ValueError(f"a round closes as 'aggregated' or 'abandoned', not {status!r}")
        now = time.time() if now is None else now
        cur = self._db.execute("UPDATE rounds SET status=?, closed_at=?, result_hash=? WHERE experiment=? AND round=?"
                               " AND status='open'", (status, now, result_hash, experiment, round_))
        if cur.rowcount == 0:
            raise StoreError(f"round {round_} of {experiment!r} is not open")
        new_state = "aggregated" if status == "aggregated" else "unused"
        if drop_payloads:
            self._db.execute("UPDATE updates SET status=?, payload_offset=NULL, payload_size=NULL WHERE experiment=?"
                             " AND round=? AND status='accepted'", (new_state, experiment, round_))
            self._drop_log(experiment, round_)
        else:
            self._db.execute("UPDATE updates SET status=? WHERE experiment=? AND round=? AND status='accepted'",
                             (new_state, experiment, round_))

    def round(self, experiment: str, round_: int) -> RoundRecord | None:
        """One round, or None."""
        found = [r for r in self.rounds(experiment, number=round_)]
        return found[0] if found else None

    def current_round(self, experiment: str) -> RoundRecord | None:
        """The open round, or None."""
        rounds = [r for r in self.rounds(experiment, status="open")]
        return rounds[-1] if rounds else None

    def rounds(self, experiment: str, *, status: str | None = None, number: int | None = None) -> list[RoundRecord]:
        """Every round (or those with ``status``, or round ``number``) with its evaluation, in order."""
        sql = ("SELECT r.round, r.status, r.opened_at, r.closed_at, r.selected, r.n, r.m, r.deadline, r.quorum,"
               " r.extensions, r.model_hash, r.result_hash, r.accepted, e.loss, e.accuracy FROM rounds r"
               " LEFT JOIN evaluations e ON e.experiment=r.experiment AND e.round=r.round WHERE r.experiment=?")
        args: tuple[Any, ...] = (experiment,)
        if status is not None:
            sql += " AND r.status=?"
            args += (status,)
        if number is not None:
            sql += " AND r.round=?"
            args += (number,)
        out = []
        for row in self._db.execute(sql + " ORDER BY r.round", args):
            values = list(row)
            values[4] = tuple(json.loads(values[4]))
            out.append(RoundRecord(*values))
        return out

    # ---- updates ----
    def add_update(self, experiment: str, *, device: str, round_: int, nonce: str, digest: str, samples: int,
                   size: int, m: int | None, payload: bytes | None, now: float | None = None) -> bool:
        """Record an accepted update; False (nothing written) if its nonce or (device, round) is already stored."""
        now = time.time() if now is None else now
        exists = self._one("SELECT 1 FROM updates WHERE experiment=? AND (nonce=? OR (device=? AND round=?))",
                           (experiment, nonce, device, round_))
        if exists:
            return False
        offset = length = None
        if payload is not None:
            offset, length = self._append_payload(experiment, round_, payload), len(payload)
            if self._depth == 0:
                self._sync_payloads()
        try:
            self._db.execute("INSERT INTO updates (experiment, device, round, nonce, digest, samples, bytes, m,"
                             " received_at, status, payload_offset, payload_size) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             (experiment, device, round_, nonce, digest, samples, size, m, now, "accepted", offset,
                              length))
        except sqlite3.IntegrityError:  # another writer got there first; the appended bytes stay unreferenced
            return False
        self._db.execute("UPDATE rounds SET accepted=accepted+1 WHERE experiment=? AND round=?",
                         (experiment, round_))
        return True

    def drop_update(self, experiment: str, nonce: str) -> bool:
        """Take an accepted update out of its open round (status ``dropped``); False if it was not accepted.

        Its row (and nonce) stays, so a copy of it is still recognised as a replay.
        """
        row = self._one("SELECT round FROM updates WHERE experiment=? AND nonce=? AND status='accepted'",
                        (experiment, nonce))
        if row is None:
            return False
        self._db.execute("UPDATE updates SET status='dropped' WHERE experiment=? AND nonce=?", (experiment, nonce))
        self._db.execute("UPDATE rounds SET accepted=accepted-1 WHERE experiment=? AND round=?",
                         (experiment, row[0]))
        return True

    def find_update(self, experiment: str, *, nonce: str | None = None, device: str | None = None,
                    round_: int | None = None) -> UpdateRecord | None:
        """The stored update with this nonce, or with this (device, round)."""
        if nonce is not None:
            where, args = "nonce=?", (nonce,)
        elif device is not None and round_ is not None:
            where, args = "device=? AND round=?", (device, round_)  # type: ignore[assignment]
        else:
            raise ValueError("find_update needs nonce=, or device= and round_=")
        rows = self._updates(f"experiment=? AND {where}", (experiment, *args))
        return rows[0] if rows else None

    def updates(self, experiment: str, round_: int | None = None) -> list[UpdateRecord]:
        """Metadata of stored updates (of one round), by round then arrival."""
        if round_ is None:
            return self._updates("experiment=?", (experiment,))
        return self._updates("experiment=? AND round=?", (experiment, round_))

    def _updates(self, where: str, args: tuple[Any, ...]) -> list[UpdateRecord]:
        rows = self._db.execute("SELECT device, round, nonce, digest, samples, bytes, m, received_at, status,"
                                f" payload_size IS NOT NULL FROM updates WHERE {where} ORDER BY round, received_at, rowid",
                                args)
        return [UpdateRecord(*row[:9], bool(row[9])) for row in rows]

    def update_payloads(self, experiment: str, round_: int) -> list[tuple[UpdateRecord, bytes]]:
        """Updates of a round whose payloads are stored (all of an open round), in arrival order."""
        rows = self._db.execute("SELECT device, round, nonce, digest, samples, bytes, m, received_at, status,"
                                " payload_offset, payload_size FROM updates WHERE experiment=? AND round=? AND"
                                " payload_size IS NOT NULL AND status!='dropped' ORDER BY received_at, rowid", (experiment, round_))
        return [(UpdateRecord(*row[:9], True), self._read_payload(experiment, round_, row[9], row[10]))
                for row in rows.fetchall()]

    # ---- rejections ----
    def add_rejection(self, experiment: str, kind: str, reason: str, *, device: str | None = None,
                      round_: int | None = None, detail: str | None = None, now: float | None = None) -> None:
        """Count one refused message (``kind``: update, energy, hello, status) with its reason."""
        now = time.time() if now is None else now
        self._db.execute("INSERT INTO rejections (experiment, received_at, kind, reason, device, round, detail)"
                         " VALUES (?,?,?,?,?,?,?)", (experiment, now, kind, reason, device, round_, detail))

    def rejections(self, experiment: str) -> list[RejectionRecord]:
        """Every rejection, oldest first."""
        rows = self._db.execute("SELECT received_at, kind, reason, device, round, detail FROM rejections"
                                " WHERE experiment=? ORDER BY id", (experiment,))
        return [RejectionRecord(*row) for row in rows]

    def rejection_counts(self, experiment: str) -> dict[str, int]:
        """reason -> number of rejections."""
        rows = self._db.execute("SELECT reason, count(*) FROM rejections WHERE experiment=? GROUP BY reason"
                                " ORDER BY reason", (experiment,))
        return {reason: count for reason, count in rows}

    # ---- energy ----
    def add_energy_report(self, experiment: str, device: str, round_: int, nonce: str, report: Mapping[str, Any],
                          *, now: float | None = None) -> bool:
        """Store a device's energy report and its per-phase figures; False if that (device, round) has one."""
        now = time.time() if now is None else now
        try:
            self._db.execute("INSERT INTO energy_reports (experiment, device, round, nonce, received_at, report)"
                             " VALUES (?,?,?,?,?,?)", (experiment, device, round_, nonce, now, _json(dict(report))))
        except sqlite3.IntegrityError:
            return False
        meter = report.get("meter")
        phases = meter.get("phases", {}) if isinstance(meter, Mapping) else {}
        for phase, figures in phases.items():
            values = [figures.get(name) if isinstance(figures, Mapping) else None for name in _PHASE_FIELDS]
            self._db.execute("INSERT INTO energy_phases (experiment, device, round, phase, joules, joules_above_idle,"
                             " seconds, samples, gap_seconds, partial, uncertainty_j) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (experiment, device, round_, str(phase), *values))
        return True

    def energy_report(self, experiment: str, device: str, round_: int) -> dict[str, Any] | None:
        """The raw energy report a device sent for a round, or None."""
        row = self._one("SELECT report FROM energy_reports WHERE experiment=? AND device=? AND round=?",
                        (experiment, device, round_))
        return None if row is None else json.loads(row[0])

    def energy_reports(self, experiment: str, *, device: str | None = None,
                       round_: int | None = None) -> list[dict[str, Any]]:
        """Raw energy reports, by round then device."""
        sql, args = "SELECT report FROM energy_reports WHERE experiment=?", [experiment]
        if device is not None:
            sql, args = sql + " AND device=?", args + [device]
        if round_ is not None:
            sql, args = sql + " AND round=?", args + [round_]
        return [json.loads(row[0]) for row in self._db.execute(sql + " ORDER BY round, device", args)]

    def energy(self, experiment: str, *, device: str | None = None, round_: int | None = None,
               phase: str | None = None) -> list[EnergyRecord]:
        """Per-phase energy figures, filtered by device, round and phase."""
        sql = ("SELECT device, round, phase, joules, joules_above_idle, seconds, samples, gap_seconds, partial,"
               " uncertainty_j FROM energy_phases WHERE experiment=?")
        args: list[Any] = [experiment]
        for column, value in (("device", device), ("round", round_), ("phase", phase)):
            if value is not None:
                sql += f" AND {column}=?"
                args.append(value)
        out = []
        for row in self._db.execute(sql + " ORDER BY round, device, phase", args):
            values = list(row)
            values[8] = None if values[8] is None else bool(values[8])
            out.append(EnergyRecord(*values))
        return out

    # ---- calibration, decisions, evaluations ----
    def add_calibration(self, experiment: str, round_: int, fit: Mapping[str, Any], *, now: float | None = None) -> None:
        """Store an energy-model calibration fit made after ``round_``."""
        now = time.time() if now is None else now
        self._db.execute("INSERT INTO calibrations (experiment, round, fitted_at, fit) VALUES (?,?,?,?)",
                         (experiment, round_, now, _json(dict(fit))))

    def calibrations(self, experiment: str) -> list[tuple[int, float, dict[str, Any]]]:
        """(round, fitted_at, fit) of every calibration, oldest first."""
        rows = self._db.execute("SELECT round, fitted_at, fit FROM calibrations WHERE experiment=? ORDER BY id",
                                (experiment,))
        return [(r, t, json.loads(f)) for r, t, f in rows]

    def add_decision(self, experiment: str, round_: int, *, policy: str, n: int, m: int, inputs: Mapping[str, Any],
                     detail: Mapping[str, Any] | None = None, now: float | None = None) -> None:
        """Store a precision decision with every input the policy saw."""
        now = time.time() if now is None else now
        self._db.execute("INSERT INTO decisions (experiment, round, decided_at, policy, n, m, inputs, detail)"
                         " VALUES (?,?,?,?,?,?,?,?)", (experiment, round_, now, policy, int(n), int(m),
                                                       _json(dict(inputs)),
                                                       _json(dict(detail)) if detail is not None else None))

    def decisions(self, experiment: str) -> list[DecisionRecord]:
        """Every decision, oldest first."""
        rows = self._db.execute("SELECT round, decided_at, policy, n, m, inputs, detail FROM decisions"
                                " WHERE experiment=? ORDER BY id", (experiment,))
        return [DecisionRecord(r, t, p, n, m, json.loads(i), json.loads(d) if d else None) for r, t, p, n, m, i, d in rows]

    def decision(self, experiment: str, round_: int) -> DecisionRecord | None:
        """The latest decision made for ``round_``, or None."""
        found = [d for d in self.decisions(experiment) if d.round == round_]
        return found[-1] if found else None

    def add_evaluation(self, experiment: str, round_: int, *, loss: float, accuracy: float, samples: int,
                       model_hash: str, now: float | None = None) -> None:
        """Store the held-out loss and accuracy of the model a round produced."""
        now = time.time() if now is None else now
        self._db.execute("INSERT OR REPLACE INTO evaluations (experiment, round, evaluated_at, loss, accuracy, samples,"
                         " model_hash) VALUES (?,?,?,?,?,?,?)",
                         (experiment, round_, now, float(loss), float(accuracy), int(samples), model_hash))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
