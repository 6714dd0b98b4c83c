"""The four things every fault test asserts (issue 14, "Faults as tests").

1. Nothing the broker acknowledged is lost: a device drops a spooled message
   only when the basestation acknowledged it, and the basestation
   acknowledges only what it committed; so at the end every edge spool is
   empty and every stored update has its energy report.
2. Nothing is aggregated twice: each aggregated round's stored result is
   exactly FedAvg of its stored updates (one per device), recomputed here
   from the kept payloads.
3. ``PRAGMA integrity_check`` is ``ok``.
4. The run completes (status 0), or exits with a one-line error: status 2,
   one ``error:`` line, no traceback.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterable

from basestation.rounds import apply_update, quantize_model
from basestation.strategies import FedAvg
from edge.wire import decode_message, dequantize, model_hash


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of a SQLite file, opened read-only."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def no_traceback(*procs: Any) -> None:
    """None of the processes' logs holds a Python traceback."""
    for proc in procs:
        text = proc.log_path.read_text()
        assert "Traceback" not in text, f"{proc.log_path.name}:\n{text[-3000:]}"


def one_line_error(proc: Any) -> str:
    """The process exited 2 with exactly one 'error:' line and no traceback; returns that line."""
    text = proc.log_path.read_text()
    assert proc.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if ": error: " in line]
    assert len(errors) == 1, text[-3000:]
    no_traceback(proc)
    return errors[0]


def nothing_lost(fed: Any, devices: Iterable[int] = ()) -> None:
    """Empty spools of the given edges; every stored update has its energy report."""
    for i in devices:
        spool = fed.root / "spool" / fed.devices[i]
        assert not list(spool.glob("*.msg")), f"{fed.devices[i]} still holds unacknowledged messages"
    with fed.store() as store:
        reports = {(e["round"], e["device"]) for e in store.energy_reports(fed.experiment)}
        updates = {(u.round, u.device) for u in store.updates(fed.experiment) if u.status != "dropped"}
        assert updates <= reports, updates - reports


def aggregated_once(fed: Any, model: str = "mlp", n: int = 8, mode: str = "int") -> int:
    """Recompute every aggregated round from its stored payloads (needs keep_payloads); returns how many."""
    checked = 0
    with fed.store() as store:
        for r in store.rounds(fed.experiment, status="aggregated"):
            payloads = store.update_payloads(fed.experiment, r.round)
            devices = [u.device for u, _ in payloads]
            assert len(devices) == len(set(devices)) == r.accepted, (r.round, devices, r.accepted)
            _, start = store.model(fed.experiment, r.round)
            results = [(dequantize(decode_message(p).tensors), u.samples) for u, p in payloads]
            expected = apply_update(quantize_model(model, start, n, mode), FedAvg().aggregate(r.round, results))
            assert model_hash(expected).hex() == r.result_hash == store.model(fed.experiment, r.round + 1)[0]
            checked += 1
    return checked


def check_all(fed: Any, bs: Any, devices: Iterable[int] = ()) -> None:
    """The four invariants for a run that completed."""
    assert bs.returncode == 0, bs.log_path.read_text()[-3000:]
    no_traceback(bs)
    nothing_lost(fed, devices)
    assert aggregated_once(fed) >= 1
    assert integrity(fed.store_path) == "ok"
