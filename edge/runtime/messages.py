"""The JSON messages of the federation protocol (docs/mqtt.md), shared by both sides.

Updates and global models use the binary wire format (``edge.wire``); the
rest is small JSON: the round plan and acks (basestation to devices), hello,
energy reports and status (devices to the basestation). Hello and energy
reports carry an HMAC-SHA256 of their canonical JSON under the device key
(``sig``), so the basestation can trust the device id in them even under
MQTT 3.1.1, where the broker cannot refuse a publish on a foreign topic::

    data = sign_json({"kind": "hello", "device": "dev-01", ...}, key)
    body = open_signed_json(data, keys.get)     # MessageError unless signed by that device
    plan = RoundPlan.from_json(payload)          # MessageError names the bad field
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

PROTOCOL_VERSION = 1
PLAN_STATES = ("open", "finished")
ACK_STATES = ("accepted", "duplicate", "rejected")
ACK_KINDS = ("update", "energy")


class MessageError(ValueError):
    """A JSON protocol message that is malformed, unsigned, forged or from an unknown device.

    ``reason`` is ``malformed``, ``unknown_device`` or ``forged``.
    """

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text}")
        self.reason = reason


def canonical(body: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8, finite numbers only."""
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise MessageError("malformed", f"not representable as JSON: {exc}") from None


def sign_json(body: Mapping[str, Any], key: bytes) -> bytes:
    """``body`` plus ``"sig"``: hex HMAC-SHA256 of :func:`canonical` (body) under ``key``."""
    if "sig" in body:
        raise ValueError("body must not contain 'sig'")
    sig = hmac.new(key, canonical(body), hashlib.sha256).hexdigest()
    return canonical({**body, "sig": sig})


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object, or raise MessageError('malformed')."""
    if len(data) > 1 << 20:
        raise MessageError("malformed", f"{what} of {len(data)} bytes is larger than 1 MiB")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError("malformed", f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageError("malformed", f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def open_signed_json(data: bytes, key_for: Callable[[str], bytes | None], what: str = "message") -> dict[str, Any]:
    """Check the signature of a device's JSON message and return its body (without ``sig``)."""
    doc = parse_json(data, what)
    sig = doc.pop("sig", None)
    device = doc.get("device")
    if not isinstance(sig, str):
        raise MessageError("forged", f"{what} has no signature")
    if not isinstance(device, str):
        raise MessageError("malformed", f"{what} names no device")
    key = key_for(device)
    if key is None:
        raise MessageError("unknown_device", f"no key for device {device!r}")
    expected = hmac.new(key, canonical(doc), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sig):
        raise MessageError("forged", f"{what} signature does not verify with the key of {device!r}")
    return doc


def _get(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in doc:
        raise MessageError("malformed", f"{what} lacks field {name!r}")
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MessageError("malformed", f"{what} field {name!r} has the wrong type: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageError("malformed", f"{what} field {name!r} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class RoundPlan:
    """What the basestation asks of the selected devices in one round (retained on qfl/<exp>/round).

    ``status="finished"`` announces the end of the experiment (no device is selected).
    ``deadline`` is wall-clock seconds since the epoch; ``model_hash`` the hex
    hash of the global model the round starts from; ``m_per_device``
    overrides ``m`` for the devices it names. ``sync`` changes whenever the
    basestation may have missed messages (it reconnected to a broker that had
    lost its session); a device that sees a new value re-sends its spool.
    """

    experiment: str
    round: int
    selected: tuple[str, ...]
    n: int
    m: int
    iterations: int
    lr: float
    batch_size: int
    deadline: float
    quorum: int
    model_hash: str
    model: str
    uplink_scheme: str = "scaled"
    momentum: float = 0.0
    mode: str = "int"
    seed: int = 0
    issued_at: float = 0.0
    status: str = "open"
    m_per_device: dict[str, int] | None = None
    sync: str = ""
    version: int = field(default=PROTOCOL_VERSION)

    def __post_init__(self) -> None:
        what = "round plan"
        if self.status not in PLAN_STATES:
            raise MessageError("malformed", f"{what} status must be one of {PLAN_STATES}, got {self.status!r}")
        for name, low, high in (("round", 0, 2**31), ("n", 1, 32), ("m", 1, 32), ("iterations", 1, 10**7),
                                ("batch_size", 1, 10**6), ("quorum", 0, 10**6)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise MessageError("malformed", f"{what} field {name!r} must be in {low}..{high}, got {value!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise MessageError("malformed", f"{what} needs lr > 0 and 0 <= momentum < 1, got {self.lr}, {self.momentum}")
        if self.mode not in ("int", "master"):
            raise MessageError("malformed", f"{what} mode must be 'int' or 'master', got {self.mode!r}")
        for device, bits in (self.m_per_device or {}).items():
            if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32:
                raise MessageError("malformed", f"{what} m_per_device[{device!r}] must be 1..32, got {bits!r}")

    def m_for(self, device: str) -> int:
        """The uplink precision ``device`` uses this round."""
        return (self.m_per_device or {}).get(device, self.m)

    def to_json(self) -> bytes:
        """Canonical JSON bytes."""
        doc = asdict(self)
        doc["selected"] = list(self.selected)
        return canonical(doc)

    @classmethod
    def from_json(cls, data: bytes) -> "RoundPlan":
        """Parse and check a plan; MessageError names the bad field."""
        doc = parse_json(data, "round plan")
        version = doc.get("version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise MessageError("malformed", f"round plan version {version!r}; this device reads {PROTOCOL_VERSION}")
        w = "round plan"
        selected = _get(doc, "selected", list, w)
        if not all(isinstance(s, str) for s in selected):
            raise MessageError("malformed", "round plan field 'selected' must list device ids")
        num = (int, float)
        return cls(experiment=_get(doc, "experiment", str, w), round=_get(doc, "round", int, w),
                   selected=tuple(selected), n=_get(doc, "n", int, w), m=_get(doc, "m", int, w),
                   iterations=_get(doc, "iterations", int, w), lr=float(_get(doc, "lr", num, w)),
                   batch_size=_get(doc, "batch_size", int, w), deadline=float(_get(doc, "deadline", num, w)),
                   quorum=_get(doc, "quorum", int, w), model_hash=_get(doc, "model_hash", str, w),
                   model=_get(doc, "model", str, w), uplink_scheme=_get(doc, "uplink_scheme", str, w),
                   momentum=float(_get(doc, "momentum", num, w)), mode=_get(doc, "mode", str, w),
                   seed=_get(doc, "seed", int, w), issued_at=float(_get(doc, "issued_at", num, w)),
                   status=_get(doc, "status", str, w),
                   m_per_device=dict(_get(doc, "m_per_device", dict, w)) if doc.get("m_per_device") else None,
                   sync=str(doc.get("sync", "")))


@dataclass(frozen=True)
class Ack:
    """The basestation's answer to a stored (or finally refused) update or energy report.

    ``status``: ``accepted`` (stored now), ``duplicate`` (stored before),
    ``rejected`` (verified but refused for good, ``reason`` says why). In every
    case the device drops the spooled message with this ``nonce``.
    """

    kind: str
    round: int
    nonce: str
    status: str
    reason: str | None = None

    def to_json(self) -> bytes:
        """Canonical JSON bytes."""
        return canonical({"kind": self.kind, "round": self.round, "nonce": self.nonce, "status": self.status,
                          "reason": self.reason})

    @classmethod
    def from_json(cls, data: bytes) -> "Ack":
        """Parse and check an ack."""
        doc = parse_json(data, "ack")
        ack = cls(kind=_get(doc, "kind", str, "ack"), round=_get(doc, "round", int, "ack"),
                  nonce=_get(doc, "nonce", str, "ack"), status=_get(doc, "status", str, "ack"),
                  reason=doc.get("reason") if isinstance(doc.get("reason"), str) else None)
        if ack.kind not in ACK_KINDS or ack.status not in ACK_STATES:
            raise MessageError("malformed", f"ack kind/status must be in {ACK_KINDS}/{ACK_STATES}, got "
                                            f"{ack.kind!r}/{ack.status!r}")
        return ack


def status_payload(device: str, state: str) -> bytes:
    """Retained ``online``/``offline`` status (also the last will)."""
    if state not in ("online", "offline"):
        raise ValueError(f"status must be 'online' or 'offline', got {state!r}")
    return canonical({"device": device, "state": state})


def parse_status(data: bytes) -> str:
    """``online`` or ``offline`` from a status payload (empty = cleared = offline)."""
    if not data:
        return "offline"
    state = parse_json(data, "status").get("state")
    if state not in ("online", "offline"):
        raise MessageError("malformed", f"status state must be 'online' or 'offline', got {state!r}")
    return state
