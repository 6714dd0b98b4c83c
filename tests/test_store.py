"""The SQLite store: schema version, transactions, deduplication, queries, and durability across processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basestation.store import SCHEMA_VERSION, Store, StoreError, weights_from_bytes, weights_to_bytes

EXP = "exp1"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "qfl.sqlite")
    s.create_experiment(EXP, {"model": "mlp", "rounds": 3})
    yield s
    s.close()


def open_round(store: Store, r: int, selected=("a", "b")) -> None:
    store.open_round(EXP, r, selected=list(selected), n=8, m=4, deadline=100.0 + r, quorum=1, model_hash=f"h{r}",
                     plan={"round": r})


def test_new_file_has_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_refuses_newer_schema_and_foreign_files(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="upgrade qfl-testbed"):
        Store(newer)
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a qfl store"):
        Store(foreign)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable qfl store"):
        Store(junk)
    with pytest.raises(ValueError, match="synchronous"):
        Store(tmp_path / "x.sqlite", synchronous="off")


def test_experiment_lifecycle(store: Store) -> None:
    with pytest.raises(StoreError, match="already exists"):
        store.create_experiment(EXP, {})
    assert store.experiment(EXP).config == {"model": "mlp", "rounds": 3}
    store.set_experiment_status(EXP, "finished", {"rounds": 3})
    rec = store.experiment(EXP)
    assert (rec.status, rec.final) == ("finished", {"rounds": 3})
    assert store.experiment("nope") is None
    with pytest.raises(StoreError, match="no experiment"):
        store.set_experiment_status("nope", "finished")


def test_updates_are_deduplicated_by_nonce_and_by_device_round(store: Store) -> None:
    open_round(store, 1)
    kw = dict(digest="d", samples=10, size=100, m=4)
    assert store.add_update(EXP, device="a", round_=1, nonce="n1", payload=b"p1", **kw)
    assert not store.add_update(EXP, device="a", round_=1, nonce="n1", payload=b"p1", **kw)   # same message
    assert not store.add_update(EXP, device="a", round_=1, nonce="n2", payload=b"p2", **kw)   # same (device, round)
    assert not store.add_update(EXP, device="b", round_=1, nonce="n1", payload=b"p3", **kw)   # replayed nonce
    assert store.add_update(EXP, device="b", round_=1, nonce="n3", payload=b"p4", **kw)
    assert store.current_round(EXP).accepted == 2
    assert [(u.device, p) for u, p in store.update_payloads(EXP, 1)] == [("a", b"p1"), ("b", b"p4")]
    assert store.find_update(EXP, nonce="n3").device == "b"
    assert store.find_update(EXP, device="a", round_=1).nonce == "n1"
    assert store.find_update(EXP, nonce="zz") is None


def test_closing_a_round_drops_payloads_and_keeps_metadata(store: Store) -> None:
    open_round(store, 1)
    store.add_update(EXP, device="a", round_=1, nonce="n1", digest="d", samples=1, size=1, m=4, payload=b"x")
    log = store.payload_dir / f"{EXP}-r1.log"
    assert log.read_bytes() == b"x"
    store.close_round(EXP, 1, "aggregated", result_hash="h2")
    assert store.update_payloads(EXP, 1) == [] and not log.exists()
    [upd] = store.updates(EXP, 1)
    assert (upd.status, upd.has_payload) == ("aggregated", False)
    assert store.current_round(EXP) is None
    with pytest.raises(StoreError, match="not open"):
        store.close_round(EXP, 1, "aggregated")
    with pytest.raises(ValueError, match="closes as"):
        store.close_round(EXP, 1, "open")


def test_payloads_can_be_kept_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "keep.sqlite"
    with Store(path) as store:
        store.create_experiment(EXP, {})
        open_round(store, 1)
        with store.transaction():
            for i in range(3):
                store.add_update(EXP, device=f"d{i}", round_=1, nonce=f"n{i}", digest="d", samples=1, size=4, m=8,
                                 payload=bytes([i]) * (1000 + i))
        store.close_round(EXP, 1, "aggregated", drop_payloads=False)
    with Store(path) as again:
        assert [(u.device, len(p), p[:1]) for u, p in again.update_payloads(EXP, 1)] == [
            ("d0", 1000, b"\x00"), ("d1", 1001, b"\x01"), ("d2", 1002, b"\x02")]


def test_orphan_payload_logs_are_removed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Store(path) as store:
        store.create_experiment(EXP, {})
        open_round(store, 1)
        store.add_update(EXP, device="a", round_=1, nonce="n1", digest="d", samples=1, size=1, m=4, payload=b"x")
    orphan = path.with_name(path.name + ".payloads") / f"{EXP}-r7.log"
    orphan.write_bytes(b"left by a crash")
    with Store(path) as again:
        assert not orphan.exists()
        assert again.update_payloads(EXP, 1)[0][1] == b"x"


def test_transaction_rolls_back_as_a_whole(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction():
            open_round(store, 1)
            with store.transaction():  # nested joins the outer
                store.add_rejection(EXP, "update", "forged")
            raise RuntimeError("crash before commit")
    assert store.rounds(EXP) == [] and store.rejection_counts(EXP) == {}


def test_savepoint_undoes_one_block_only(store: Store) -> None:
    with pytest.raises(StoreError, match="needs an open transaction"):
        with store.savepoint():
            pass
    with store.transaction():
        store.add_rejection(EXP, "update", "kept")
        with pytest.raises(ZeroDivisionError):
            with store.savepoint():
                store.add_rejection(EXP, "update", "undone")
                1 / 0
        with store.savepoint():
            store.add_rejection(EXP, "update", "also kept")
    assert store.rejection_counts(EXP) == {"also kept": 1, "kept": 1}


def test_rounds_with_evaluations_and_plans(store: Store) -> None:
    open_round(store, 1)
    store.extend_round(EXP, 1, 200.0, {"round": 1, "deadline": 200.0})
    assert store.plan(EXP, 1) == {"round": 1, "deadline": 200.0}
    store.close_round(EXP, 1, "aggregated", result_hash="h2")
    store.add_evaluation(EXP, 1, loss=1.5, accuracy=0.4, samples=360, model_hash="h2")
    open_round(store, 2, selected=("b",))
    store.close_round(EXP, 2, "abandoned")
    r1, r2 = store.rounds(EXP)
    assert (r1.status, r1.accuracy, r1.deadline, r1.extensions, r1.selected) == ("aggregated", 0.4, 200.0, 1, ("a", "b"))
    assert (r2.status, r2.accuracy, r2.selected) == ("abandoned", None, ("b",))
    assert [r.round for r in store.rounds(EXP, status="abandoned")] == [2]


def test_models_round_trip(store: Store) -> None:
    w = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "0.bias": np.array([0.5, -1], np.float32)}
    store.save_model(EXP, 1, "h1", w)
    store.save_model(EXP, 2, "h2", {k: v * 2 for k, v in w.items()})
    h, got = store.model(EXP, 1)
    assert h == "h1" and list(got) == ["0.weight", "0.bias"]
    np.testing.assert_array_equal(got["0.weight"], w["0.weight"])
    r, h, latest = store.latest_model(EXP)
    assert (r, h) == (2, "h2") and latest["0.bias"].tolist() == [1.0, -2.0]
    assert store.model(EXP, 9) is None
    assert list(weights_from_bytes(weights_to_bytes(w))) == list(w)


def test_energy_reports_and_queries(store: Store) -> None:
    report = {"round": 1, "meter": {"phases": {
        "train": {"joules": 2.0, "joules_above_idle": 0.5, "seconds": 1.0, "samples": 100, "gap_seconds": 0.0,
                  "partial": False, "uncertainty_j": 0.01},
        "uplink": {"joules": 0.1, "joules_above_idle": 0.02, "seconds": 0.05, "samples": 5, "gap_seconds": 0.0,
                   "partial": True, "uncertainty_j": 0.001}}}}
    assert store.add_energy_report(EXP, "a", 1, "e1", report)
    assert not store.add_energy_report(EXP, "a", 1, "e2", report)
    assert store.add_energy_report(EXP, "b", 1, "e3", {"round": 1, "meter": None})
    assert [(e.device, e.phase) for e in store.energy(EXP)] == [("a", "train"), ("a", "uplink")]
    [up] = store.energy(EXP, device="a", round_=1, phase="uplink")
    assert (up.joules_above_idle, up.partial, up.samples) == (0.02, True, 5)
    assert store.energy_report(EXP, "b", 1) == {"round": 1, "meter": None}
    assert len(store.energy_reports(EXP, round_=1)) == 2


def test_devices_decisions_calibrations_rejections(store: Store) -> None:
    store.register_device(EXP, "a", {"dataset_size": 120, "board": "pi4", "meter_id": None, "software": "0.1"})
    store.register_device(EXP, "a", {"dataset_size": 130, "board": "pi4"})
    assert store.set_device_state(EXP, "a", "online")
    assert not store.set_device_state(EXP, "zz", "online")
    [dev] = store.devices(EXP)
    assert (dev.dataset_size, dev.state) == (120, "online")  # the first declaration stays (it bounds samples)
    store.add_decision(EXP, 1, policy="fixed", n=8, m=4, inputs={"n": 8, "vals": np.array([1, 2])})
    store.add_decision(EXP, 2, policy="model", n=6, m=3, inputs={"eps": 0.1}, detail={"energy": 1.0})
    assert [(d.round, d.policy, d.n, d.m) for d in store.decisions(EXP)] == [(1, "fixed", 8, 4), (2, "model", 6, 3)]
    assert store.decision(EXP, 1).inputs == {"n": 8, "vals": [1, 2]}
    store.add_calibration(EXP, 1, {"alpha": 1.2})
    assert store.calibrations(EXP)[0][2] == {"alpha": 1.2}
    for reason in ("forged", "forged", "stale_round"):
        store.add_rejection(EXP, "update", reason, device="a", round_=1)
    assert store.rejection_counts(EXP) == {"forged": 2, "stale_round": 1}
    assert store.rejections(EXP)[0].reason == "forged"


def test_commit_survives_sigkill_of_the_writer(tmp_path: Path) -> None:
    """A child process commits, prints, and is killed; a new Store sees exactly the committed rows."""
    path = tmp_path / "k.sqlite"
    code = f"""
import os, signal, sys
from basestation.store import Store
s = Store({str(path)!r})
s.create_experiment("e", {{}})
s.open_round("e", 1, selected=["a"], n=8, m=8, deadline=1.0, quorum=1, model_hash="h", plan={{}})
with s.transaction():
    s.add_rejection("e", "update", "committed")
    s.add_update("e", device="a", round_=1, nonce="n1", digest="d", samples=1, size=3, m=8, payload=b"abc")
s._db.execute("BEGIN IMMEDIATE")
s.add_rejection("e", "update", "uncommitted")
s.add_update("e", device="b", round_=1, nonce="n2", digest="d", samples=1, size=3, m=8, payload=b"def")
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ready" and done.returncode == -9
    with Store(path) as again:
        assert again.rejection_counts("e") == {"committed": 1}
        assert [(u.device, p) for u, p in again.update_payloads("e", 1)] == [("a", b"abc")]


def test_readonly_reader_never_writes_or_removes_payload_logs(tmp_path: Path) -> None:
    from basestation.store import Store, StoreError

    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    path = tmp_path / "s.sqlite"
    with Store(path) as writer:
        writer.create_experiment("exp", {"model": "mlp"})
        orphan = writer.payload_dir / "exp-r9.log"
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"a round being written")
        with Store(path, readonly=True) as reader:
            assert [e.id for e in reader.experiments()] == ["exp"]
            assert orphan.exists()  # a reader leaves the writer's files alone
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.create_experiment("other", {})
