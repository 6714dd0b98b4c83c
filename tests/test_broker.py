"""The private Mosquitto: config, ACL, lifecycle by PID, persistence, TLS, and the MqttLink plumbing."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from basestation.broker import Broker, BrokerError, BrokerTls, mosquitto_config
from firmware_tools.broker_auth import MosquittoMissing, acl_text, find_program, rabbitmq_commands, rabbitmq_script
from firmware_tools.credentials import BrokerAccount
from edge.mqtt import BrokerSettings, Message, MqttError, MqttLink, Topics, connect_blocking, parse_url

EXP = "exp1"
T = Topics(EXP)
ACCOUNTS = [BrokerAccount("bs", "bs-secret"), BrokerAccount("user-a", "pw-a", "dev-a"),
            BrokerAccount("user-b", "pw-b", "dev-b")]


def link(url: str, client_id: str, *, user: str | None = None, password: str | None = None, protocol: str = "5",
         subs: list[str] = (), **kw: object) -> MqttLink:
    settings = BrokerSettings(url, username=user, password=password, protocol=protocol, reconnect_max=1.0)
    out = MqttLink(settings, client_id, subscriptions=[(s, 1) for s in subs], **kw)  # type: ignore[arg-type]
    connect_blocking(out, 5.0)
    return out


def messages(lnk: MqttLink, wait: float = 0.5) -> list[Message]:
    """Messages received within ``wait`` seconds of quiet."""
    out = []
    while (event := lnk.next_event(wait)) is not None:
        if isinstance(event, Message):
            out.append(event)
    return out


def test_acl_gives_devices_only_their_own_topics() -> None:
    text = acl_text(ACCOUNTS, EXP)
    blocks: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("user "):
            current = blocks.setdefault(line, [])
        elif line.startswith("topic "):
            current.append(line)
    assert blocks["user bs"] == ["topic readwrite qfl/exp1/#"]
    dev_a = blocks["user user-a"]
    assert sorted(line for line in dev_a if line.startswith("topic write")) == [
        f"topic write qfl/exp1/device/dev-a/{k}" for k in ("energy", "hello", "status", "update")]
    assert sorted(line for line in dev_a if line.startswith("topic read")) == [
        "topic read qfl/exp1/device/dev-a/ack", "topic read qfl/exp1/model/+", "topic read qfl/exp1/round"]
    assert "dev-b" not in "\n".join(dev_a)


def test_rabbitmq_rights_match_the_mosquitto_acl() -> None:
    """The generated topic permissions, applied as RabbitMQ does: a regexp over the routing key ('/' -> '.')."""
    import re
    import shlex

    commands = rabbitmq_commands(ACCOUNTS, EXP)
    topic_rights = {c[3]: (c[5], c[6]) for c in commands if c[0] == "set_topic_permissions"}
    queue_rights = {c[3]: c[4] for c in commands if c[0] == "set_permissions"}
    assert [c[1:] for c in commands if c[0] == "add_user"] == [[a.username, a.password] for a in ACCOUNTS]

    def allowed(user: str, access: str, topic: str) -> bool:
        write, read = topic_rights[user]
        return re.search(write if access == "write" else read, topic.replace("/", ".")) is not None

    for kind in ("hello", "update", "energy", "status"):
        assert allowed("user-a", "write", T.device("dev-a", kind))
        assert not allowed("user-a", "write", T.device("dev-b", kind))
        assert not allowed("user-a", "read", T.device("dev-a", kind))
    assert allowed("user-a", "read", T.round) and allowed("user-a", "read", T.model(7))
    assert allowed("user-a", "read", T.device("dev-a", "ack")) and not allowed("user-a", "read", T.device("dev-b", "ack"))
    assert not allowed("user-a", "write", T.round) and not allowed("user-a", "write", T.model(7))
    assert not allowed("user-a", "read", "qfl/exp2/round") and not allowed("user-a", "write", "qfl/exp1x/device/dev-a/hello")
    assert allowed("bs", "write", T.round) and allowed("bs", "read", T.device("dev-b", "update"))
    assert not allowed("bs", "read", "qfl/exp2/round")
    # A device may hold only the session queues of its own client id.
    assert re.search(queue_rights["user-a"], "mqtt-subscription-qfl-exp1-dev-aqos1")
    assert not re.search(queue_rights["user-a"], "mqtt-subscription-qfl-exp1-dev-bqos1")
    assert commands[-1][:5] == ["set_policy", "-p", "/", "--apply-to", "queues"]
    script = rabbitmq_script(ACCOUNTS, EXP)
    assert script.startswith("#!/bin/sh") and "rabbitmqctl add_user user-b pw-b" in script
    assert shlex.split(script.splitlines()[-1])[1:] == commands[-1]
    with pytest.raises(ValueError, match="topic level"):
        rabbitmq_commands([BrokerAccount("u", "pw", "dev.a")], EXP)


def test_acl_and_config_reject_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="broker username"):
        acl_text([BrokerAccount("a b", "pw")], EXP)
    with pytest.raises(ValueError, match="experiment id"):
        acl_text(ACCOUNTS, "exp/1")
    conf = mosquitto_config(port=1884, host="127.0.0.1", directory=tmp_path, password_file=None, acl_file=None)
    assert "allow_anonymous true" in conf and "listener 1884 127.0.0.1" in conf and "log_dest stderr" in conf


def test_missing_program_says_how_to_install() -> None:
    with pytest.raises(MosquittoMissing, match="apt-get install mosquitto mosquitto-clients"):
        find_program("mosquitto-not-installed-here")
    assert issubclass(MosquittoMissing, FileNotFoundError)


def test_parse_url() -> None:
    assert parse_url("mqtt://10.0.0.2") == ("mqtt", "10.0.0.2", 1883)
    assert parse_url("mqtts://broker.lan:9000") == ("mqtts", "broker.lan", 9000)
    for bad in ("http://x", "mqtt://", "mqtt://u:p@host", "mqtt://host/path", "mqtt://host:99999"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_url(bad)


def test_start_stop_by_pid(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "b").start()
    try:
        pid = broker.pid
        assert pid is not None and broker.running and broker.url.startswith("mqtt://127.0.0.1:")
        with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
            pass
        assert f"pid {pid}" in repr(broker)
    finally:
        broker.stop()
    assert not broker.running and broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.stop()  # safe twice
    assert "terminating" in broker.log_text()


def test_fixed_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match="in use|exited"):
            Broker(tmp_path / "b", port=port, start_timeout=5).start()


def test_two_brokers_get_different_ports(broker_factory) -> None:
    a, b = broker_factory(), broker_factory()
    assert a.port != b.port and a.running and b.running


def test_wrong_password_is_refused(broker_factory) -> None:
    broker = broker_factory(accounts=ACCOUNTS, experiment=EXP)
    with pytest.raises(MqttError, match="refused"):
        link(broker.url, "x", user="user-a", password="wrong")
    with pytest.raises(MqttError, match="refused"):
        link(broker.url, "y")  # anonymous


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_acl_device_cannot_speak_for_another(broker_factory, protocol: str) -> None:
    broker = broker_factory(accounts=ACCOUNTS, experiment=EXP)
    bs = link(broker.url, "bs", user="bs", password="bs-secret", subs=["qfl/exp1/#"])
    a = link(broker.url, "dev-a", user="user-a", password="pw-a", protocol=protocol,
             subs=[T.round, T.models, T.device("dev-a", "ack"), T.device("dev-b", "ack")])
    try:
        forged = a.publish(T.device("dev-b", "update"), b"forged")
        forged.wait_for_publish(3)
        a.publish(T.device("dev-a", "update"), b"own").wait_for_publish(3)
        a.publish(T.round, b"fake plan").wait_for_publish(3)
        bs.publish(T.device("dev-b", "ack"), b"ack for b").wait_for_publish(3)
        bs.publish(T.device("dev-a", "ack"), b"ack for a").wait_for_publish(3)
        got_bs = [(m.topic, m.payload) for m in messages(bs)]
        got_a = [(m.topic, m.payload) for m in messages(a)]
        assert (T.device("dev-a", "update"), b"own") in got_bs
        assert (T.device("dev-b", "update"), b"forged") not in got_bs
        assert (T.round, b"fake plan") not in got_bs
        assert got_a == [(T.device("dev-a", "ack"), b"ack for a")]
        if protocol == "5":  # only MQTT 5 can tell the publisher it was refused
            assert "Not authorized" in a.refused_publishes.get(forged.mid, "")
        else:
            assert a.refused_publishes == {}
    finally:
        a.stop()
        bs.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_survives_broker_restart(broker, protocol: str) -> None:
    sub = link(broker.url, "keeper", protocol=protocol, subs=["qfl/exp1/device/+/update"])
    pub = link(broker.url, "pub", protocol=protocol)
    try:
        sub.stop()  # offline, session kept
        pub.publish(T.round, b"plan-1", retain=True).wait_for_publish(3)
        pub.publish(T.device("d", "update"), b"queued while offline").wait_for_publish(3)
        pub.stop()
        broker.restart()  # SIGTERM: Mosquitto writes its persistence file
        again = link(broker.url, "keeper", protocol=protocol, subs=["qfl/exp1/device/+/update"])
        assert [m.payload for m in messages(again)] == [b"queued while offline"]
        fresh = link(broker.url, "fresh", protocol=protocol, subs=[T.round])
        assert [(m.payload, m.retain) for m in messages(fresh)] == [(b"plan-1", True)]
        again.stop()
        fresh.stop()
    finally:
        sub.stop()


def test_kill_and_restart_on_same_port(broker) -> None:
    port, pid = broker.port, broker.pid
    broker.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.start()
    assert broker.port == port and broker.pid != pid
    client = link(broker.url, "after-kill")
    client.stop()


def test_link_reconnects_and_resubscribes_after_restart(broker) -> None:
    sub = link(broker.url, "resub", subs=[T.round])
    try:
        broker.kill()
        broker.start()
        deadline = time.monotonic() + 10
        while not sub.connected or sub.events.qsize() == 0:
            assert time.monotonic() < deadline, "no reconnect within 10 s"
            time.sleep(0.05)
        pub = link(broker.url, "pub2")
        pub.publish(T.round, b"after").wait_for_publish(3)
        pub.stop()
        assert b"after" in [m.payload for m in messages(sub)]
    finally:
        sub.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 made with the openssl tool."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=qfl test CA", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "client.key",
             "-out", "client.csr", "-subj", "/CN=dev-a", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.crt", "-days", "2", cwd=d)
    return {name: d / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_tls_listener(broker_factory, tls_files: dict[str, Path], tmp_path: Path) -> None:
    tls = BrokerTls(certfile=str(tls_files["server.crt"]), keyfile=str(tls_files["server.key"]))
    broker = broker_factory(accounts=ACCOUNTS, experiment=EXP, tls=tls)
    assert broker.url.startswith("mqtts://")
    settings = BrokerSettings(broker.url, username="bs", password="bs-secret", ca_file=str(tls_files["ca.crt"]))
    good = MqttLink(settings, "tls-ok", subscriptions=[(T.round, 1)])
    connect_blocking(good, 5)
    good.publish(T.round, b"over tls").wait_for_publish(3)
    assert [m.payload for m in messages(good)] == [b"over tls"]
    good.stop()
    # A client that does not trust the test CA never gets a session.
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "k", "-out", "c.crt", "-days", "1",
             "-subj", "/CN=other", cwd=other_ca)
    untrusting = MqttLink(BrokerSettings(broker.url, username="bs", password="bs-secret",
                                         ca_file=str(other_ca / "c.crt")), "tls-bad")
    with pytest.raises(MqttError):
        connect_blocking(untrusting, 1)
    with pytest.raises(MqttError, match="TLS file not found"):
        MqttLink(BrokerSettings(broker.url, ca_file=str(tmp_path / "missing.crt")), "tls-missing")


def test_tls_with_client_certificates(broker_factory, tls_files: dict[str, Path]) -> None:
    tls = BrokerTls(certfile=str(tls_files["server.crt"]), keyfile=str(tls_files["server.key"]),
                    cafile=str(tls_files["ca.crt"]), require_certificate=True)
    broker = broker_factory(accounts=ACCOUNTS, experiment=EXP, tls=tls)
    base = BrokerSettings(broker.url, username="user-a", password="pw-a", ca_file=str(tls_files["ca.crt"]))
    with_cert = MqttLink(BrokerSettings(broker.url, username="user-a", password="pw-a",
                                        ca_file=str(tls_files["ca.crt"]), cert_file=str(tls_files["client.crt"]),
                                        key_file=str(tls_files["client.key"])), "with-cert")
    connect_blocking(with_cert, 5)
    with_cert.stop()
    with pytest.raises(MqttError):
        connect_blocking(MqttLink(base, "without-cert"), 1)
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        BrokerSettings(broker.url, cert_file=str(tls_files["client.crt"]))


def test_round_trip_on_the_test_broker_or_a_field_broker(mqtt_settings: BrokerSettings) -> None:
    """Runs against a private broker, or the one given with --broker-url (and its credentials)."""
    topic = f"qfl/pytest-{os.getpid()}/round"  # never an experiment's topic on a field broker
    receiver = MqttLink(mqtt_settings, f"rt-receiver-{os.getpid()}", subscriptions=[(topic, 1)], persistent=False)
    sender = MqttLink(mqtt_settings, f"rt-sender-{os.getpid()}", persistent=False)
    connect_blocking(receiver, 10)
    connect_blocking(sender, 10)
    try:
        payload = os.urandom(16)
        sender.publish(topic, payload).wait_for_publish(5)
        assert payload in [m.payload for m in messages(receiver, 1.0)]
    finally:
        sender.stop()
        receiver.stop()
