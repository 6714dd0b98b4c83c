"""Accept or reject a received message, with one reason per way it can be wrong.

Pure functions over bytes: no network, no store. The basestation passes the
round it is collecting, the hash of the global model it published, the
device keys and the nonces of the updates it has already stored; it gets a
:class:`Verdict` back and never an exception for bad data.

Checks run in this order, and the first failure is the reason:

1. ``malformed``: size, magic, version, length, CRC or header fields
   (``wire_reason`` holds the :class:`~edge.wire.errors.WireError` reason);
   also a model message where an update was expected, and vice versa.
2. ``unknown_device``: no key for the device id in the header.
3. ``forged``: the HMAC-SHA256 does not verify with that device's key.
4. ``malformed``: the tensor table or payloads are invalid (checked after
   the signature, so an unsigned sender cannot make the decoder work).
5. ``wrong_topic`` (only with ``sender``): signed by another device than the
   one whose topic it arrived on. Before the replay and round checks, so a
   device speaking on another's topic is named as such whatever its round.
6. ``replayed``: the nonce was seen before. Before the round checks, so a
   redelivered copy of a stored update is recognised as a duplicate (and
   can be acknowledged again) even after its round closed.
7. ``wrong_experiment``, 8. ``stale_round`` (an earlier or a later round, or
   ``round=None``: no round is open; ``detail`` says which), 9.
   ``wrong_base`` (relative to another model).

>>> import numpy as np
>>> from edge.wire import quantize_update, encode_update
>>> key = b"k" * 32
>>> ts = quantize_update({"w": np.ones(4, np.float32)}, 8, np.random.default_rng(0))
>>> data = encode_update(ts, experiment="e1", device="pi-01", round=3, base_hash=bytes(32),
...                      samples=10, key=key)
>>> verify_update(data, experiment="e1", round=3, base_hash=bytes(32), key={"pi-01": key}.get,
...               seen_nonces=set()).reason
'ok'
>>> verify_update(data, experiment="e1", round=4, base_hash=bytes(32), key=key, seen_nonces=set()).reason
'stale_round'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container

from edge.wire.errors import WireError
from edge.wire.message import DEFAULT_LIMITS, Header, Limits, Message, decode_message, read_header, signature_ok

VERDICT_REASONS = ("ok", "malformed", "unknown_device", "forged", "wrong_topic", "replayed", "wrong_experiment",
                   "stale_round", "wrong_base")

KeyLookup = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one message.

    ``reason`` is one of :data:`VERDICT_REASONS`; ``detail`` a sentence for
    the log; ``wire_reason`` the WireError reason when malformed; ``header``
    what could be read (e.g. the claimed device id) even when rejected;
    ``message`` the decoded message, only when accepted.
    """

    reason: str
    detail: str = ""
    message: Message | None = None
    wire_reason: str | None = None
    header: Header | None = None

    @property
    def accepted(self) -> bool:
        """True when every check passed (reason ``"ok"``)."""
        return self.reason == "ok"


def check_signed_update(data: bytes | bytearray | memoryview, *, key: bytes | KeyLookup,
                        limits: Limits = DEFAULT_LIMITS) -> Verdict:
    """Checks 1-4 of :func:`verify_update` (header, key, HMAC, decoding): the costly part, which needs no round state.

    An ingest worker runs it and hands the verdict to the coordinator, whose
    ``verify_update(..., checked=verdict)`` runs the rest.
    """
    return _signed_message(data, "update", key, limits)


def verify_update(data: bytes | bytearray | memoryview, *, experiment: str, round: int | None, base_hash: bytes,
                  key: bytes | KeyLookup, seen_nonces: Container[bytes], sender: str | None = None,
                  limits: Limits = DEFAULT_LIMITS, checked: Verdict | None = None) -> Verdict:
    """Verify a device's update for ``round`` of ``experiment``, relative to the model ``base_hash``.

    ``key`` is the device key, or a function device id -> key (None if
    unknown). ``seen_nonces`` is only read: record ``verdict.message.nonce``
    once the update is stored. ``round`` None: no round is open (any update
    that passes the earlier checks is ``stale_round``). ``sender``: the device
    whose topic the message arrived on. ``checked``: the verdict of
    :func:`check_signed_update` on these bytes, computed elsewhere (by a
    trusted ingest worker), so that checks 1-4 are not run again.
    """
    first = checked if checked is not None else check_signed_update(data, key=key, limits=limits)
    if not first.accepted:
        return first
    head, message = first.header, first.message
    assert head is not None and message is not None
    if sender is not None and head.device != sender:
        return Verdict("wrong_topic", f"signed by {head.device!r} but published on the topic of {sender!r}",
                       header=head)
    if message.nonce in seen_nonces:
        return Verdict("replayed", f"nonce {message.nonce.hex()} from {head.device!r} was seen before",
                       header=head)
    verdict = _context(head, experiment, round)
    if verdict is not None:
        return verdict
    if round is None:
        return Verdict("stale_round", f"update for round {head.round}, but no round is open (between rounds)",
                       header=head)
    if message.base_hash != base_hash:
        return Verdict("wrong_base", f"update from {head.device!r} is relative to model {message.base_hash.hex()[:16]}, "
                                     f"expected {bytes(base_hash).hex()[:16]}", header=head)
    return Verdict("ok", f"update from {head.device!r} for round {head.round}", message=message, header=head)


def verify_model(data: bytes | bytearray | memoryview, *, experiment: str, key: bytes, round: int | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> Verdict:
    """Verify a global-model message on a device: basestation signature, experiment and (if given) round.

    The model's own hash is checked while decoding (a mismatch is malformed,
    wire_reason "bad_model_hash").
    """
    first = _signed_message(data, "model", key, limits)
    if not first.accepted:
        return first
    head, message = first.header, first.message
    assert head is not None and message is not None
    verdict = _context(head, experiment, round)
    if verdict is not None:
        return verdict
    return Verdict("ok", f"model for round {head.round} from {head.device!r}", message=message, header=head)


def _signed_message(data: bytes | bytearray | memoryview, msg_type: str, key: bytes | KeyLookup,
                    limits: Limits) -> Verdict:
    """Header, key, signature and decoding of a ``msg_type`` message: accepted, or the first failure."""
    head, verdict = _signed_header(data, msg_type, key, limits)
    if verdict is not None:
        return verdict
    message, verdict = _decode(data, head, limits)
    if verdict is not None:
        return verdict
    return Verdict("ok", f"{msg_type} signed by {head.device!r} and decoded", message=message, header=head)


def _signed_header(data, msg_type: str, key: bytes | KeyLookup, limits: Limits) -> tuple[Header | None, Verdict | None]:
    try:
        head = read_header(data, limits=limits)
    except WireError as exc:
        return None, Verdict("malformed", str(exc), wire_reason=exc.reason)
    if head.msg_type != msg_type:
        return None, Verdict("malformed", f"expected a {msg_type} message, got a {head.msg_type} message",
                             wire_reason="bad_type", header=head)
    device_key = key(head.device) if callable(key) else key
    if device_key is None:
        return None, Verdict("unknown_device", f"no key for device {head.device!r}", header=head)
    try:
        ok = signature_ok(data, device_key)
    except WireError as exc:  # a key lookup that returned something that is not a key
        return None, Verdict("unknown_device", f"key for {head.device!r} is unusable: {exc}", header=head)
    if not ok:
        return None, Verdict("forged", f"HMAC does not verify with the key of {head.device!r}", header=head)
    return head, None


def _decode(data, head: Header, limits: Limits) -> tuple[Message | None, Verdict | None]:
    try:
        return decode_message(data, limits=limits), None
    except WireError as exc:
        return None, Verdict("malformed", str(exc), wire_reason=exc.reason, header=head)


def _context(head: Header, experiment: str, round: int | None) -> Verdict | None:
    if head.experiment != experiment:
        return Verdict("wrong_experiment", f"message for experiment {head.experiment!r}, expected {experiment!r}",
                       header=head)
    if round is not None and head.round != round:
        when = "an earlier" if head.round < round else "a later"
        return Verdict("stale_round", f"message for round {head.round} ({when} round), expected round {round}",
                       header=head)
    return None
