"""MQTT plumbing shared by the edge runtime and the basestation.

One small class, :class:`MqttLink`, wraps a paho-mqtt client the way both
sides use it: MQTT 5 (or 3.1.1) with a persistent session under a fixed client
id, optional TLS and credentials, automatic reconnects, subscriptions that are
renewed on every connect, and every callback turned into an event on one
queue so the caller's own thread does all the work::

    settings = BrokerSettings.from_url("mqtt://127.0.0.1:1883", username="dev-01", password="...")
    link = MqttLink(settings, client_id="qfl-dev-01", subscriptions=[(Topics("exp1").round, 1)])
    link.start()
    event = link.next_event(timeout=1.0)   # Connected / Disconnected / Refused / Message
    link.publish(Topics("exp1").device("dev-01", "hello"), b"{}", qos=1)
    link.stop()

:class:`Topics` names every topic of one experiment (see docs/mqtt.md).
Nothing here knows about rounds or updates; this module imports paho-mqtt and
the standard library only, so it runs on a device.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("qfl.mqtt")

PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Reason codes (MQTT 5 numbering; paho maps 3.1.1 return codes onto them) that
# no number of retries will fix: the runtime stops and says why.
PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MqttError(ConnectionError):
    """The broker cannot be used: refused credentials, bad TLS files, bad URL."""


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a usable experiment or device id, else raise ValueError.

    Ids become MQTT topic levels, file names and SQLite keys, so they are kept
    to 1..64 characters of letters, digits, ``_``, ``.`` and ``-``.

        >>> check_name("dev-01", "device id")
        'dev-01'
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} must be 1-64 characters of letters, digits, '_', '.' or '-' "
                         f"starting with a letter or digit, got {value!r}")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect: URL, credentials, protocol, TLS files, timing.

    ``url`` is ``mqtt://host[:port]`` (plain, default port 1883) or
    ``mqtts://host[:port]`` (TLS, default port 8883). ``ca_file`` is the CA
    that signed the broker's certificate (None with mqtts means the system's
    CAs); ``cert_file``/``key_file`` are a client certificate when the broker
    asks for one.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    protocol: str = "5"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    reconnect_min: float = 0.5
    reconnect_max: float = 8.0
    session_expiry: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        parse_url(self.url)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {self.protocol!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if not 5 <= self.keepalive <= 3600:
            raise ValueError(f"keepalive must be 5..3600 seconds, got {self.keepalive!r}")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ValueError(f"need 0 < reconnect_min <= reconnect_max, got {self.reconnect_min!r}, "
                             f"{self.reconnect_max!r}")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "BrokerSettings":
        """Settings for ``url`` with any other field given by keyword."""
        return cls(url=url, **options)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], base_dir: Path | None = None) -> "BrokerSettings":
        """Build settings from a ``[broker]`` table of a TOML config.

        Relative file paths are resolved against ``base_dir`` (the directory of
        the config file). Unknown keys are an error, so typos do not pass silently.
        """
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in [broker]: {', '.join(unknown)}; expected some of: "
                             f"{', '.join(sorted(known))}")
        values = dict(table)
        for key in ("ca_file", "cert_file", "key_file"):
            if values.get(key) is not None:
                path = Path(str(values[key])).expanduser()
                if base_dir is not None and not path.is_absolute():
                    path = base_dir / path
                values[key] = str(path)
        if "protocol" in values:
            values["protocol"] = str(values["protocol"])
        return cls(**values)

    @property
    def host(self) -> str:
        """Host name or address from the URL."""
        return parse_url(self.url)[1]

    @property
    def port(self) -> int:
        """TCP port from the URL (or its scheme's default)."""
        return parse_url(self.url)[2]

    @property
    def tls(self) -> bool:
        """True for ``mqtts://`` URLs."""
        return parse_url(self.url)[0] == "mqtts"

    def with_credentials(self, username: str | None, password: str | None) -> "BrokerSettings":
        """A copy with other credentials (same broker)."""
        return replace(self, username=username, password=password)


def parse_url(url: str) -> tuple[str, str, int]:
    """Split ``mqtt://host:port`` or ``mqtts://host:port`` into (scheme, host, port).

        >>> parse_url("mqtts://broker.lan")
        ('mqtts', 'broker.lan', 8883)
    """
    if not isinstance(url, str):
        raise ValueError(f"broker URL must be a string like 'mqtt://host:1883', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"broker URL must not hold credentials (put them in username/password): {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"broker URL takes no path or query: {url!r}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"broker URL has an invalid port: {url!r}") from None
    return parts.scheme, unquote(parts.hostname), port


class Topics:
    """The topic names of one experiment (the authoritative list is docs/mqtt.md).

        >>> t = Topics("exp1")
        >>> t.round, t.model(3), t.device("dev-01", "update")
        ('qfl/exp1/round', 'qfl/exp1/model/3', 'qfl/exp1/device/dev-01/update')
    """

    DEVICE_KINDS = ("hello", "update", "energy", "status", "ack")

    def __init__(self, experiment: str):
        self.experiment = check_name(experiment, "experiment id")
        self.prefix = f"qfl/{experiment}"

    @property
    def round(self) -> str:
        """The retained round plan."""
        return f"{self.prefix}/round"

    def model(self, round_: int) -> str:
        """The global model that round ``round_`` starts from."""
        return f"{self.prefix}/model/{int(round_)}"

    @property
    def models(self) -> str:
        """Subscription filter for every round's model."""
        return f"{self.prefix}/model/+"

    def device(self, device: str, kind: str) -> str:
        """``qfl/<exp>/device/<id>/<kind>`` for kind in :attr:`DEVICE_KINDS`."""
        if kind not in self.DEVICE_KINDS:
            raise ValueError(f"device topic kind must be one of {self.DEVICE_KINDS}, got {kind!r}")
        return f"{self.prefix}/device/{check_name(device, 'device id')}/{kind}"

    def devices(self, kind: str) -> str:
        """Subscription filter for ``kind`` messages of every device."""
        if kind not in self.DEVICE_KINDS:
            raise ValueError(f"device topic kind must be one of {self.DEVICE_KINDS}, got {kind!r}")
        return f"{self.prefix}/device/+/{kind}"

    def parse(self, topic: str) -> tuple[str, str | None, int | None]:
        """Classify a topic of this experiment as (kind, device id, round).

        Kinds: ``round``, ``model`` (with its round), or a device kind (with
        the device id). Anything else raises ValueError.
        """
        if not topic.startswith(self.prefix + "/"):
            raise ValueError(f"topic {topic!r} is not under {self.prefix}/")
        rest = topic[len(self.prefix) + 1:].split("/")
        if rest == ["round"]:
            return "round", None, None
        if len(rest) == 2 and rest[0] == "model" and rest[1].isdigit():
            return "model", None, int(rest[1])
        if len(rest) == 3 and rest[0] == "device" and rest[2] in self.DEVICE_KINDS and _NAME.match(rest[1]):
            return rest[2], rest[1], None
        raise ValueError(f"topic {topic!r} is not a qfl topic")


# ---- events handed from the network thread to the caller's thread ----

@dataclass(frozen=True)
class Connected:
    """The broker accepted the connection; ``session_present`` if it kept our session."""

    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    """The connection dropped; paho reconnects by itself."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """The broker refused the connection; ``permanent`` if retrying cannot help."""

    reason: str
    permanent: bool


@dataclass(frozen=True)
class Message:
    """One received PUBLISH. ``mid`` and ``qos`` are what :meth:`MqttLink.ack` needs."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False


Event = Connected | Disconnected | Refused | Message


@dataclass
class MqttLink:
    """A paho client with a persistent session and one event queue.

    ``manual_ack=True`` holds back the PUBACK of each received QoS 1 message
    until :meth:`ack` is called, so a message the caller has not yet stored is
    redelivered by the broker after a crash. ``will`` is ``(topic, payload)``,
    published retained at QoS 1 by the broker if the connection is lost.
    """

    settings: BrokerSettings
    client_id: str
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    will: tuple[str, bytes] | None = None
    manual_ack: bool = False
    persistent: bool = True

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("a persistent MQTT session needs a fixed, non-empty client id")
        self.events: queue.Queue[Event] = queue.Queue()
        self._connected = threading.Event()
        self.last_refusal: Refused | None = None
        # mid -> reason of every PUBLISH the broker refused (MQTT 5 PUBACK reason
        # code, e.g. 'Not authorized' from the ACL); MQTT 3.1.1 cannot report it.
        self.refused_publishes: dict[int, str] = {}
        self.last_connect_failure: str | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        s = self.settings
        version = PROTOCOLS[s.protocol]
        kwargs: dict[str, Any] = {}
        if version != paho.MQTTv5:
            kwargs["clean_session"] = not self.persistent
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=version,
                             manual_ack=self.manual_ack, **kwargs)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            for path in (s.ca_file, s.cert_file, s.key_file):
                if path is not None and not Path(path).is_file():
                    raise MqttError(f"TLS file not found: {path}")
            try:
                client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError) as exc:
                raise MqttError(f"cannot load the TLS files ({s.ca_file}, {s.cert_file}, {s.key_file}): {exc}") from exc
            client.tls_insecure_set(s.tls_insecure)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.reconnect_delay_set(s.reconnect_min, s.reconnect_max)  # type: ignore[arg-type]
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # ---- lifecycle ----
    def start(self) -> None:
        """Connect in the background; progress arrives as events. Returns at once."""
        s = self.settings
        kwargs: dict[str, Any] = {}
        if PROTOCOLS[s.protocol] == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = s.session_expiry
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive, **kwargs)
        self._client.loop_start()

    def stop(self, *, publish: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Optionally publish one last retained message, then disconnect cleanly."""
        if publish is not None and self.connected:
            info = self._client.publish(publish[0], publish[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds passed (False)."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the current connection."""
        return self._connected.is_set()

    # ---- traffic ----
    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a message; paho sends it now or after the next reconnect.

        Returns paho's handle: ``info.wait_for_publish(timeout)`` waits for the PUBACK.
        """
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_confirmed(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                          timeout: float = 30.0) -> bool:
        """Publish once connected and wait for the broker's PUBACK; False if that takes over ``timeout`` s.

        For the last words of a process (the basestation's final plan): a
        plain publish while disconnected would be queued in a client that is
        about to go away.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.wait_connected(min(0.5, max(0.0, deadline - time.monotonic()))):
                continue
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if info.is_published():
                    return True
            except (RuntimeError, ValueError):  # the connection dropped under us: try again
                continue
        return False

    def ack(self, message: Message) -> None:
        """Send the PUBACK of a message received with ``manual_ack=True``."""
        if self.manual_ack and message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def wake(self) -> None:
        """Make a ``next_event`` that is waiting (with no timeout) return None now."""
        self.post(None)

    def post(self, event: Any) -> None:
        """Queue an event from another source, so that one loop over ``next_event`` sees both in order."""
        self.events.put(event)

    # ---- paho callbacks (network thread) ----
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            permanent = reason.value in PERMANENT_REFUSALS
            log.warning("broker %s refused %s: %s", self.settings.url, self.client_id, reason)
            self.last_refusal = Refused(str(reason), permanent)
            self.events.put(self.last_refusal)
            return
        self.last_refusal = None
        if self.last_connect_failure is not None:
            log.info("connected to %s after: %s", self.settings.url, self.last_connect_failure)
            self.last_connect_failure = None
        if self.subscriptions:
            client.subscribe(list(self.subscriptions))
        self._connected.set()
        self.events.put(Connected(bool(flags.session_present)))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` around the connect attempt, so the
        # exception being handled is the reason; it passes none itself.
        reason = connect_failure_reason(sys.exc_info()[1], self.settings.host)
        if reason == self.last_connect_failure:
            log.debug("cannot connect to %s: %s", self.settings.url, reason)
            return
        self.last_connect_failure = reason
        s = self.settings
        log.warning("cannot connect to %s: %s; retrying every %g s, backing off to %g s", s.url, reason,
                    s.reconnect_min, s.reconnect_max)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.info("disconnected from %s: %s", self.settings.url, reason)
            self.events.put(Disconnected(str(reason)))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason is not None and reason.is_failure:
            log.warning("broker refused publish %d of %s: %s", mid, self.client_id, reason)
            self.refused_publishes[mid] = str(reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.events.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid, bool(msg.dup)))


def connect_failure_reason(exc: BaseException | None, host: str) -> str:
    """A few words on why a TCP/TLS connection to the broker at ``host`` failed.

        >>> connect_failure_reason(ConnectionRefusedError(111, "Connection refused"), "127.0.0.1")
        'connection refused'
    """
    if exc is None:
        return "connection failed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host!r} ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def connect_blocking(link: MqttLink, timeout: float = 10.0) -> None:
    """Start ``link`` and wait for the first CONNACK; raise MqttError on refusal or timeout.

    The events stay queued for the caller (including the Connected one).
    """
    link.start()
    deadline = time.monotonic() + timeout
    while not link.wait_connected(0.05):
        refusal = link.last_refusal
        if refusal is not None:
            link.stop()
            raise MqttError(f"broker at {link.settings.url} refused client {link.client_id!r}: {refusal.reason}; "
                            "check username/password and the broker's password file and ACL")
        if time.monotonic() > deadline:
            link.stop()
            hint = ("; a broker that speaks only MQTT 3.1.1 (RabbitMQ before 3.13) closes an MQTT 5 connection "
                    "without answering: try protocol = \"3.1.1\"" if link.settings.protocol == "5" else "")
            raise MqttError(f"no answer from the broker at {link.settings.url} within {timeout} s; "
                            f"is it running and reachable?{hint}")

