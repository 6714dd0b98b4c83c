"""The federation's parts without processes: messages, spool, configs, round rules, ingest, provisioning."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from basestation.config import BasestationConfig
from firmware_tools.credentials import Credentials, CredentialsError, DeviceCredentials
from basestation.ingest import Ingest
from basestation.rounds import RoundProgress, quorum_count, select_devices
from basestation.store import Store
from edge.mqtt import BrokerSettings, Topics, connect_blocking, MqttLink
from edge.runtime.config import ConfigError, DeviceConfig
from edge.runtime.messages import (Ack, MessageError, RoundPlan, open_signed_json, parse_status, sign_json,
                                   status_payload)
from edge.runtime.spool import Spool
from edge.wire.signing import public_key
from edge.wire import encode_update, model_hash, quantize_update
from firmware_tools.provision import ProvisionError, provision

KEY = bytes(range(32))
T = Topics("exp1")


def plan(**changes) -> RoundPlan:
    base = dict(experiment="exp1", round=3, selected=("a", "b"), n=8, m=4, iterations=10, lr=0.1, batch_size=32,
                deadline=1000.5, quorum=2, model_hash="ab" * 32, model="mlp")
    base.update(changes)
    return RoundPlan(**base)


# ---- messages ----

def test_plan_round_trip_and_checks() -> None:
    p = plan(m_per_device={"b": 2})
    again = RoundPlan.from_json(p.to_json())
    assert again == p and again.m_for("a") == 4 and again.m_for("b") == 2
    doc = json.loads(p.to_json())
    for field, value, message in (("n", 40, "'n' must be in 1..32"), ("lr", "fast", "'lr' has the wrong type"),
                                  ("selected", "a", "'selected' has the wrong type"), ("mode", "x", "mode must be")):
        with pytest.raises(MessageError, match=message):
            RoundPlan.from_json(json.dumps({**doc, field: value}).encode())
    with pytest.raises(MessageError, match="lacks field 'deadline'"):
        RoundPlan.from_json(json.dumps({k: v for k, v in doc.items() if k != "deadline"}).encode())
    with pytest.raises(MessageError, match="not JSON"):
        RoundPlan.from_json(b"\xff\x00")
    with pytest.raises(MessageError, match="must be a JSON object"):
        RoundPlan.from_json(b"[1, 2]")


def test_signed_json() -> None:
    data = sign_json({"device": "a", "round": 1, "x": [1.5, None]}, KEY)
    assert open_signed_json(data, {"a": KEY}.get) == {"device": "a", "round": 1, "x": [1.5, None]}
    tampered = data.replace(b'"round":1', b'"round":2')
    with pytest.raises(MessageError) as err:
        open_signed_json(tampered, {"a": KEY}.get)
    assert err.value.reason == "forged"
    with pytest.raises(MessageError) as err:
        open_signed_json(data, {}.get)
    assert err.value.reason == "unknown_device"
    with pytest.raises(MessageError) as err:
        open_signed_json(b'{"device": "a"}', {"a": KEY}.get)
    assert err.value.reason == "forged"
    with pytest.raises(MessageError, match="not representable"):
        sign_json({"device": "a", "loss": float("nan")}, KEY)


def test_ack_and_status() -> None:
    ack = Ack("update", 3, "ab12", "accepted")
    assert Ack.from_json(ack.to_json()) == ack
    with pytest.raises(MessageError, match="kind/status"):
        Ack.from_json(b'{"kind":"update","round":1,"nonce":"x","status":"maybe"}')
    assert parse_status(status_payload("a", "online")) == "online"
    assert parse_status(b"") == "offline"
    with pytest.raises(MessageError):
        parse_status(b'{"state":"asleep"}')


def test_topics() -> None:
    assert T.parse("qfl/exp1/device/a-1/update") == ("update", "a-1", None)
    assert T.parse("qfl/exp1/model/12") == ("model", None, 12)
    for bad in ("qfl/exp2/round", "qfl/exp1/device/a/secret", "qfl/exp1/model/x", "qfl/exp1/device/+/hello"):
        with pytest.raises(ValueError):
            T.parse(bad)
    with pytest.raises(ValueError, match="experiment id"):
        Topics("a/b")


# ---- spool ----

def test_spool_is_ordered_durable_and_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_entries=3)
    spool.put(kind="update", round_=1, nonce="aa", topic="t/1", payload=b"\x00one\nline")
    spool.put(kind="energy", round_=1, nonce="bb", topic="t/2", payload=b"{}")
    (tmp_path / "s" / ".0000000009-update-r9-cc.msg.tmp").write_bytes(b"half")  # a crash mid-write
    again = Spool(tmp_path / "s", max_entries=3)  # as after a restart
    assert [(e.nonce, e.topic, e.payload) for e in again.entries()] == [("aa", "t/1", b"\x00one\nline"),
                                                                        ("bb", "t/2", b"{}")]
    assert not list((tmp_path / "s").glob("*.tmp"))
    again.put(kind="update", round_=2, nonce="cc", topic="t/3", payload=b"3")
    again.put(kind="update", round_=3, nonce="dd", topic="t/4", payload=b"4")  # full: the oldest goes
    assert [e.nonce for e in again.entries()] == ["bb", "cc", "dd"]
    assert again.remove("cc") and not again.remove("cc")
    assert [e.nonce for e in again.entries()] == ["bb", "dd"]
    with pytest.raises(ValueError, match="hex nonce"):
        again.put(kind="update", round_=1, nonce="../x", topic="t", payload=b"")
    again.save_state({"last_round": 3})
    assert Spool(tmp_path / "s").load_state() == {"last_round": 3}


# ---- configs ----

MODEL_SIGNING_KEY = bytes.fromhex("22" * 32)  # the basestation's Ed25519 private key in these tests


def device_doc(**changes) -> dict:
    doc = {"device_id": "dev-01", "experiment": "exp1", "hmac_key": "11" * 32,
           "model_public_key": public_key(MODEL_SIGNING_KEY).hex(),
           "shard": "shard.npz", "broker": {"url": "mqtt://10.0.0.2", "username": "dev-01", "password": "pw"}}
    doc.update(changes)
    return doc


def test_device_config(tmp_path: Path) -> None:
    cfg = DeviceConfig.from_mapping(device_doc(), tmp_path)
    assert cfg.shard == tmp_path / "shard.npz" and cfg.meter_port is None and cfg.broker.port == 1883
    assert cfg.client_id == "qfl-exp1-dev-01" and cfg.spool_dir == tmp_path / "spool"
    for doc, message in ((device_doc(hmac_key="xyz"), "hmac_key must be hex"),
                         (device_doc(hmac_key="11"), "at least 16 bytes"),
                         (device_doc(model_public_key="22" * 16), "must be 32 bytes"),
                         ({**{k: v for k, v in device_doc().items() if k != "model_public_key"},
                           "model_key": "22" * 32}, "provision the device again"),
                         (device_doc(seed="0"), "seed must be int"),
                         (device_doc(meter_prot="/dev/ttyACM0"), "unknown setting.*meter_prot"),
                         (device_doc(broker={"url": "http://x"}), r"\[broker\]: broker URL"),
                         (device_doc(broker={"url": "mqtt://x", "protocol": "4"}), "protocol must be"),
                         (device_doc(broker={"url": "mqtt://x", "colour": 1}), "unknown key"),
                         ({"experiment": "exp1"}, "missing required setting 'device_id'")):
        with pytest.raises(ConfigError, match=message):
            DeviceConfig.from_mapping(doc, tmp_path)
    path = tmp_path / "device.toml"
    path.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        DeviceConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        DeviceConfig.load(tmp_path / "missing.toml")


def test_basestation_config(tmp_path: Path) -> None:
    cfg = BasestationConfig.from_mapping({"experiment": "e", "round": {"quorum": 0.5}, "precision": {
        "policy": "measured", "hysteresis": 0.05}}, tmp_path)
    assert cfg.store == tmp_path / "e.sqlite" and cfg.round.quorum == 0.5
    assert cfg.precision.options == {"hysteresis": 0.05} and cfg.round.extension == cfg.round.deadline_seconds
    assert cfg.broker.username is None  # taken from the credentials at start
    for doc, message in (({"experiment": "e", "round": {"quorum": 1.5}}, r"quorum must be in \[0.0, 1.0\]"),
                         ({"experiment": "e", "model": "resnet"}, "model must be one of"),
                         ({"experiment": "e", "training": {"strategy": "mean"}}, "unknown strategy"),
                         ({"experiment": "e", "training": {"uplink_scheme": "zip"}}, "uplink_scheme must be"),
                         ({"experiment": "e", "round": {"deadline": 3}}, r"unknown setting\(s\) deadline"),
                         ({"experiment": "e", "precision": {"policy": "best"}}, "policy must be one of")):
        with pytest.raises(ConfigError, match=message):
            BasestationConfig.from_mapping(doc, tmp_path)


def test_credentials_file(tmp_path: Path) -> None:
    creds = Credentials("exp1", "bs", "pw", b"k" * 32, {"d1": DeviceCredentials("d1", "p1", b"h" * 32)})
    path = creds.save(tmp_path / "c.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Credentials.load(path) == creds
    doc = json.loads(path.read_text())
    doc["devices"]["d1"]["hmac_key"] = "00"
    path.write_text(json.dumps(doc))
    with pytest.raises(CredentialsError, match="need at least 16"):
        Credentials.load(path)
    with pytest.raises(CredentialsError, match="missing field 'basestation'"):
        Credentials.from_json({"experiment": "e", "model_signing_key": "00" * 32})
    with pytest.raises(CredentialsError, match="provision the testbed again"):
        Credentials.from_json({"experiment": "e", "model_key": "00" * 32, "basestation": {}})
    assert len(creds.model_public_key) == 32 and creds.model_public_key != creds.model_signing_key


# ---- round rules ----

def test_selection_is_seeded_and_quorum_rounds_up() -> None:
    devices = [f"d{i}" for i in range(10)]
    first = select_devices(devices, 4, seed=1, round_=5)
    assert first == select_devices(list(reversed(devices)), 4, seed=1, round_=5) and len(first) == 4
    assert first != select_devices(devices, 4, seed=1, round_=6) or first != select_devices(devices, 4, 2, 5)
    assert select_devices(devices[:3], 4, 0, 1) == devices[:3]
    assert [quorum_count(4, q) for q in (0.0, 0.5, 0.75, 0.76, 1.0)] == [1, 2, 3, 4, 4]
    assert quorum_count(0, 0.5) == 0


def test_round_verdicts() -> None:
    p = RoundProgress(round=1, selected=("a", "b", "c"), deadline=100.0, quorum=2)
    assert p.verdict(50.0, 1) == "wait"
    p.answered |= {"a"}
    assert p.verdict(100.0, 1) == "extend"
    p.extensions = 1
    assert p.verdict(100.0, 1) == "abandon"
    p.answered |= {"b"}
    assert p.verdict(99.0, 1) == "wait" and p.verdict(100.0, 1) == "aggregate"
    p.answered |= {"c"}
    assert p.verdict(0.0, 1) == "aggregate"


# ---- ingest against a real store, no network ----

@pytest.fixture
def ingest(tmp_path: Path) -> Ingest:
    store = Store(tmp_path / "s.sqlite")
    store.create_experiment("exp1", {})
    weights = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    digest = model_hash(weights)
    store.save_model("exp1", 1, digest.hex(), weights)
    store.open_round("exp1", 1, selected=["a", "b"], n=8, m=8, deadline=1e12, quorum=1, model_hash=digest.hex(),
                     plan={})
    keys = {"a": KEY, "b": bytes(32), "c": b"c" * 32}
    ing = Ingest(store, "exp1", keys)
    ing.open_round(1, digest, ["a", "b"], weights)
    yield ing
    store.close()


def update(ingest: Ingest, device: str = "a", key: bytes = KEY, shape=(3, 2), **kw) -> bytes:
    values = {"w": np.full(shape, 0.25, np.float32), "b": np.ones(2, np.float32)}
    args = dict(experiment="exp1", device=device, round=1, base_hash=ingest.round.base_hash, samples=10, key=key)
    args.update(kw)
    return encode_update(quantize_update(values, 8, np.random.default_rng(0)), **args)


def test_ingest_accepts_deduplicates_and_acks(ingest: Ingest) -> None:
    data = update(ingest)
    first = ingest.handle(T.device("a", "update"), data)
    assert first.accepted and first.samples == 10 and first.ack[0] == T.device("a", "ack")
    np.testing.assert_allclose(first.delta["w"], 0.25)
    again = ingest.handle(T.device("a", "update"), data)
    assert again.reason == "replayed" and Ack.from_json(again.ack[1]).status == "duplicate"
    other = ingest.handle(T.device("a", "update"), update(ingest))
    assert other.reason == "duplicate_round" and Ack.from_json(other.ack[1]).status == "rejected"
    assert ingest.store.rejection_counts("exp1") == {"duplicate_round": 1, "replayed": 1}
    assert len(ingest.store.updates("exp1")) == 1


def test_ingest_rejections(ingest: Ingest) -> None:
    cases = [
        (T.device("b", "update"), update(ingest), "wrong_topic", False),
        (T.device("c", "update"), update(ingest, device="c", key=b"c" * 32), "not_selected", True),
        (T.device("a", "update"), update(ingest, shape=(2, 3)), "bad_shape", True),
        (T.device("a", "update"), update(ingest, key=bytes(32)), "forged", False),
        (T.device("a", "update"), b"junk", "malformed", False),
        (T.device("a", "update"), update(ingest, round=2), "stale_round", True),
        ("qfl/exp1/elsewhere", b"", "wrong_topic", False),
    ]
    for topic, data, reason, acked in cases:
        outcome = ingest.handle(topic, data)
        assert (outcome.reason, outcome.ack is not None) == (reason, acked), topic
    assert ingest.store.updates("exp1") == []
    assert sum(ingest.store.rejection_counts("exp1").values()) == len(cases)


def test_ingest_presence_and_energy(ingest: Ingest) -> None:
    hello = sign_json({"kind": "hello", "device": "a", "experiment": "exp1", "dataset_size": 120}, KEY)
    assert ingest.handle(T.device("a", "hello"), hello).accepted
    assert ingest.eligible() == ["a"]
    ingest.handle(T.device("a", "status"), status_payload("a", "offline"))
    assert ingest.eligible() == []
    assert ingest.handle(T.device("zz", "status"), status_payload("zz", "online")).reason == "unknown_device"
    report = {"kind": "energy", "device": "a", "experiment": "exp1", "round": 1, "nonce": "ee", "meter": None}
    ok = ingest.handle(T.device("a", "energy"), sign_json(report, KEY))
    assert ok.accepted and Ack.from_json(ok.ack[1]).status == "accepted"
    dup = ingest.handle(T.device("a", "energy"), sign_json(report, KEY))
    assert Ack.from_json(dup.ack[1]).status == "duplicate"
    late = ingest.handle(T.device("a", "energy"), sign_json({**report, "round": 7, "nonce": "ff"}, KEY))
    assert late.reason == "unknown_round"
    assert ingest.handle(T.device("a", "energy"), sign_json(report, bytes(32))).reason == "forged"


def test_topic_is_checked_before_the_round_and_between_rounds_says_so(ingest: Ingest) -> None:
    # signed by a, published on b's topic, for a round that is not open: the topic is what is wrong
    outcome = ingest.handle(T.device("b", "update"), update(ingest, round=5))
    assert outcome.reason == "wrong_topic"
    data = update(ingest)
    ingest.close_round()
    between = ingest.handle(T.device("a", "update"), data)
    assert between.reason == "stale_round"
    assert "no round is open" in ingest.store.rejections("exp1")[-1].detail
    assert "-1" not in ingest.store.rejections("exp1")[-1].detail


def test_retained_updates_and_reports_are_refused_and_cleared(ingest: Ingest) -> None:
    topic = T.device("a", "update")
    outcome = ingest.handle(topic, update(ingest), retained=True)
    assert (outcome.reason, outcome.ack, outcome.clear) == ("retained", None, topic)
    report = sign_json({"kind": "energy", "device": "a", "experiment": "exp1", "round": 1, "nonce": "r1",
                        "meter": None}, KEY)
    assert ingest.handle(T.device("a", "energy"), report, retained=True).reason == "retained"
    assert ingest.handle(topic, b"").reason == "ignored"  # our own clearing, echoed back
    hello = sign_json({"kind": "hello", "device": "a", "experiment": "exp1", "dataset_size": 10}, KEY)
    assert ingest.handle(T.device("a", "hello"), hello, retained=True).accepted  # hello is retained by design
    assert ingest.store.updates("exp1") == [] and ingest.store.rejection_counts("exp1") == {"retained": 2}


def test_ingest_refuses_impossible_claims(ingest: Ingest) -> None:
    hello = sign_json({"kind": "hello", "device": "a", "experiment": "exp1", "dataset_size": 10, "board": "pi4"}, KEY)
    assert ingest.handle(T.device("a", "hello"), hello).accepted
    big = ingest.handle(T.device("a", "update"), update(ingest, samples=2**32 - 1))
    assert big.reason == "out_of_bounds" and Ack.from_json(big.ack[1]).reason == "out_of_bounds"
    # a later hello cannot raise the declared shard size
    again = sign_json({"kind": "hello", "device": "a", "experiment": "exp1", "dataset_size": 2**32 - 1}, KEY)
    ingest.handle(T.device("a", "hello"), again)
    assert ingest.handle(T.device("a", "update"), update(ingest, samples=11)).reason == "out_of_bounds"
    assert ingest.handle(T.device("a", "update"), update(ingest, samples=10)).accepted
    now = ingest.store.round("exp1", 1).opened_at + 5.0
    for joules in (1e300, -1e9):
        phases = {"train": {"joules": abs(joules), "joules_above_idle": joules, "seconds": 2.0}}
        report = {"kind": "energy", "device": "a", "experiment": "exp1", "round": 1, "nonce": f"n{joules}",
                  "meter": {"board": "pi4", "phases": phases}, "sent_at": now}
        out = ingest.handle(T.device("a", "energy"), sign_json(report, KEY), now)
        assert out.reason == "out_of_bounds" and "impossible for board 'pi4'" in \
            ingest.store.rejections("exp1")[-1].detail
    assert ingest.store.energy_reports("exp1") == []


# ---- provisioning ----

def test_provision_bundles_and_broker_logins(tmp_path: Path, broker_factory) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        np.savez(shards / f"device-{i:03d}.npz", x=np.zeros((3, 64), np.float32), y=np.zeros(3, np.int64))
    out = tmp_path / "prov"
    result = provision(out, experiment="exp1", devices=2, broker_url="mqtt://127.0.0.1:1883", shards=shards)
    assert sorted(result.bundles) == ["device-000", "device-001"]
    creds = Credentials.load(result.credentials)
    assert stat.S_IMODE(result.credentials.stat().st_mode) == 0o600
    assert all(line.split(":", 1)[1].startswith("$") for line in result.password_file.read_text().splitlines())
    assert "user device-001" in result.acl_file.read_text()
    rabbit = out / "broker" / "rabbitmq-setup.sh"
    assert "device-001" in rabbit.read_text() and stat.S_IMODE(rabbit.stat().st_mode) == 0o600
    cfg = DeviceConfig.load(result.bundles["device-000"] / "device.toml")
    assert cfg.hmac_key == creds.devices["device-000"].hmac_key and cfg.model_public_key == creds.model_public_key
    assert cfg.shard.is_file() and stat.S_IMODE((result.bundles["device-000"] / "device.toml").stat().st_mode) == 0o600
    assert BasestationConfig.load(result.basestation_config).experiment == "exp1"
    # Again with one more device: existing secrets stay, so bundles already on a Pi keep working.
    again = provision(out, experiment="exp1", devices=["device-000", "device-001", "pi-extra"],
                      broker_url="mqtt://127.0.0.1:1883")
    grown = Credentials.load(again.credentials)
    assert grown.devices["device-000"] == creds.devices["device-000"] and "pi-extra" in grown.devices
    # The logins work against a real broker with the generated ACL.
    broker = broker_factory(accounts=grown.accounts(), experiment="exp1")
    login = DeviceConfig.load(again.bundles["pi-extra"] / "device.toml").broker
    link = MqttLink(BrokerSettings(broker.url, username=login.username, password=login.password), "pi-extra")
    connect_blocking(link, 5)
    link.stop()
    with pytest.raises(ProvisionError, match="belongs to experiment"):
        provision(out, experiment="exp2", devices=1, broker_url="mqtt://x")
    with pytest.raises(ProvisionError, match="no shard for"):
        provision(tmp_path / "p2", experiment="exp1", devices=3, broker_url="mqtt://x", shards=shards)
    with pytest.raises(ProvisionError, match="distinct"):
        provision(tmp_path / "p3", experiment="exp1", devices=["a", "a"], broker_url="mqtt://x")


def test_broker_run_command(tmp_path: Path, spawn, qfl_command) -> None:
    result = provision(tmp_path / "prov", experiment="exp1", devices=1, broker_url="mqtt://127.0.0.1:1")
    proc = spawn([*qfl_command, "broker", "run", "--dir", str(tmp_path / "b"), "--credentials",
                  str(result.credentials), "--port", "0"], name="broker-run")
    deadline = time.monotonic() + 20
    while "broker running" not in proc.log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.log_path.read_text()
        time.sleep(0.05)
    url = proc.log_path.read_text().split("broker running: ")[1].split()[0]
    pid = int(proc.log_path.read_text().split("(pid ")[1].split(",")[0])
    creds = Credentials.load(result.credentials)
    entry = creds.devices["device-000"]
    link = MqttLink(BrokerSettings(url, username=entry.username, password=entry.password), "x")
    connect_blocking(link, 5)
    link.stop()
    proc.terminate()
    assert proc.wait(15) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    anonymous = subprocess.run([*qfl_command, "broker", "run", "--dir", str(tmp_path / "c"), "--bind", "0.0.0.0"],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode == 2 and "refusing an anonymous broker" in anonymous.stderr


# ---- the edge runtime's decisions, without a broker ----

def test_edge_runtime_skips_what_it_cannot_do_and_trains_what_it_can(tmp_path: Path) -> None:
    from basestation.rounds import initial_model
    from edge.data import save_shard
    from edge.mqtt import Message
    from edge.runtime.device import EdgeRuntime
    from edge.wire import encode_model

    rng = np.random.default_rng(0)
    shard = save_shard(tmp_path / "shard.npz", rng.random((40, 64), dtype=np.float32), rng.integers(0, 10, 40))
    cfg = DeviceConfig.from_mapping(device_doc(shard=str(shard), publish_timeout=0.1), tmp_path)
    runtime = EdgeRuntime(cfg)
    runtime.x, runtime.y = np.load(shard)["x"], np.load(shard)["y"]
    weights = initial_model("mlp", 0)
    tensors = quantize_update(weights, 32, None)

    def deliver(topic: str, payload: bytes) -> None:
        runtime._handle(Message(topic, payload, 1, False, 1))
        runtime._maybe_train()

    def model_msg(round_: int, key: bytes = MODEL_SIGNING_KEY) -> bytes:
        return encode_model(tensors, experiment="exp1", round=round_, key=key)

    good = dict(selected=("dev-01",), model_hash=model_hash(weights).hex(), deadline=time.time() + 60, iterations=3)
    deliver(T.round, b"not json")                                   # ignored
    deliver(T.round, plan(round=1, model="resnet", **good).to_json())
    deliver(T.model(1), model_msg(1))                               # a plan it cannot carry out: logged, skipped
    assert 1 in runtime._failed_rounds and runtime.last_round == 0 and len(runtime.spool) == 0
    deliver(T.model(2), model_msg(2, key=bytes(32)))                # forged model: ignored
    deliver(T.round, plan(round=2, **good).to_json())
    assert 2 not in runtime.models and runtime.last_round == 0
    deliver(T.round, plan(round=3, **{**good, "selected": ("someone-else",)}).to_json())
    deliver(T.model(3), model_msg(3))                               # not selected
    assert runtime.last_round == 0
    deliver(T.round, plan(round=4, **good).to_json())
    deliver(T.model(4), model_msg(4))                               # trains; no broker, so the spool keeps both
    assert runtime.last_round == 4 and sorted(e.kind for e in runtime.spool.entries()) == ["energy", "update"]
    deliver(T.round, plan(round=4, **good).to_json())               # a redelivered plan is not trained again
    assert len(runtime.spool) == 2 and runtime.rounds_trained == 1
    assert Spool(cfg.spool_dir).load_state() == {"experiment": "exp1", "last_round": 4}
    update = next(e for e in runtime.spool.entries() if e.kind == "update")
    deliver(T.device("dev-01", "ack"), Ack("update", 4, update.nonce, "accepted").to_json())
    assert [e.kind for e in runtime.spool.entries()] == ["energy"]


def test_the_edge_runtime_stays_light() -> None:
    """What `qfl edge run` loads on a device: no basestation, scikit-learn, matplotlib or rich."""
    code = ("import sys, edge.runtime.cli, edge.runtime.device, edge.network, edge.trainer, edge.wire, edge.data;"
            "from edge.meter import PowerMeter;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'basestation', 'sklearn', 'matplotlib', 'rich',"
            " 'scipy'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
