"""Encode and decode signed update (format version 1) and global-model (version 2) messages.

Layout (all integers little endian; full tables in docs/wire-format.md)::

    fixed header (72 bytes)  magic "QFLW", version, type, kind, flags, total length,
                             round, samples, tensor count, experiment/device lengths,
                             base model hash (32), nonce (16)
    experiment, device       UTF-8, lengths from the fixed header
    tensor table             per tensor: name length, bits, rounding, ndim, scale
                             exponent, payload length, dims (u32 each), name
    payloads                 packed codes, ceil(bits * count / 8) bytes each, in table order
    CRC32                    of every byte before it
    signature                of every byte before it: an update (version 1) ends in the
                             HMAC-SHA256 under its device's key (32 bytes), a global
                             model (version 2) in the basestation's Ed25519 signature (64)

The decoder checks every declared size against the real length and the
:class:`Limits` before it allocates anything, and raises :class:`WireError`
(one ``reason`` per failure) for anything else than a well-formed message.

>>> import numpy as np
>>> from edge.wire.tensor import QuantizedTensor
>>> t = QuantizedTensor("0.bias", (3,), 3, -2, "nearest", np.array([1, -1, 3]))
>>> key = bytes(32)
>>> data = encode_update([t], experiment="e1", device="pi-01", round=2, base_hash=bytes(32),
...                      samples=100, key=key, nonce=bytes(16))
>>> len(data) == message_size([("0.bias", (3,), 3)], experiment="e1", device="pi-01")
True
>>> decode_message(data, key=key).tensors[0] == t
True
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from edge.wire.bits import pack_bits, packed_size, unpack_bits
from edge.wire.errors import WireError
from edge.wire.signing import SIGNATURE_SIZE
from edge.wire.tensor import MIN_SCALE_EXP, ROUNDINGS, QuantizedTensor, dequantize, max_scale_exp

MAGIC = b"QFLW"
VERSION = 1  # updates: HMAC-SHA256 trailer
MODEL_VERSION = 2  # global models: Ed25519 trailer (edge.wire.signing)
READABLE_VERSIONS = (1, 2)

MSG_TYPES = {"update": 1, "model": 2}
KINDS = {"difference": 0, "full": 1}
ROUNDING_CODES = {name: code for code, name in enumerate(ROUNDINGS)}  # stochastic 0, nearest 1, none 2

# magic, version, type, kind, flags, total length, round, samples, tensor count,
# experiment length, device length, base hash, nonce
_FIXED = struct.Struct("<4sBBBBIIIHBB32s16s")
# name length, bits, rounding, ndim, scale exponent, payload length (dims and name follow)
_TENSOR = struct.Struct("<BBBBhI")
_CRC = struct.Struct("<I")
MAC_SIZE = 32
HASH_SIZE = 32
NONCE_SIZE = 16
MIN_KEY_SIZE = 16
FIXED_HEADER_SIZE = _FIXED.size  # 72
TENSOR_HEADER_SIZE = _TENSOR.size  # 10, plus 4 per dimension and the name
TRAILER_SIZE = _CRC.size + MAC_SIZE  # 36, an update's
MODEL_TRAILER_SIZE = _CRC.size + SIGNATURE_SIZE  # 68, a model's


def trailer_size(version: int) -> int:
    """Bytes of CRC and signature at the end of a message of format ``version`` (1: 36, 2: 68)."""
    return MODEL_TRAILER_SIZE if version == MODEL_VERSION else TRAILER_SIZE
_U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces before allocating anything.

    >>> Limits(max_message_bytes=2**20).max_tensors
    1024
    """

    max_message_bytes: int = 64 * 2**20
    max_tensors: int = 1024
    max_tensor_elements: int = 2**24
    max_total_elements: int = 2**25
    max_name_length: int = 255
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_tensors", "max_tensor_elements", "max_total_elements",
                     "max_name_length", "max_ndim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_name_length > 255 or self.max_ndim > 255 or self.max_tensors > 65535:
            raise ValueError("Limits cannot exceed the format's own fields: max_name_length <= 255, "
                             "max_ndim <= 255, max_tensors <= 65535")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Header:
    """The message fields before the tensor table, as :func:`read_header` returns them."""

    version: int
    msg_type: str
    kind: str
    experiment: str
    device: str
    round: int
    samples: int
    base_hash: bytes
    nonce: bytes
    tensor_count: int
    total_length: int


@dataclass(frozen=True)
class Message:
    """A decoded (or to-be-encoded) update or global-model message.

    ``msg_type`` is ``"update"`` (device -> basestation; ``base_hash`` is the
    hash of the global model the update is relative to) or ``"model"``
    (basestation -> devices; ``device`` is the sender id and ``base_hash`` the
    model's own hash). ``kind`` is ``"difference"`` or ``"full"``.
    """

    msg_type: str
    experiment: str
    device: str
    round: int
    base_hash: bytes
    samples: int
    kind: str
    tensors: tuple[QuantizedTensor, ...]
    nonce: bytes

    def __post_init__(self) -> None:
        tensors = tuple(self.tensors)
        if not all(isinstance(t, QuantizedTensor) for t in tensors):
            raise WireError("bad_field", "tensors must be QuantizedTensor objects (see edge.wire.quantize_update)")
        object.__setattr__(self, "tensors", tensors)

    def weights(self) -> dict[str, np.ndarray]:
        """Name -> float32 array of every tensor (the dequantized delta or model)."""
        return dequantize(self.tensors)

    @property
    def payload_bytes(self) -> int:
        """Sum of the packed payload sizes of all tensors."""
        return sum(t.payload_size for t in self.tensors)


def model_hash(weights: Mapping[str, ArrayLike]) -> bytes:
    """SHA-256 (32 bytes) identifying a model's float32 weights.

    Tensors are taken in sorted name order; each contributes its name, shape
    and little-endian float32 values, with -0.0 hashed as 0.0.

    >>> import numpy as np
    >>> model_hash({"w": np.zeros(2, np.float32)}) == model_hash({"w": -np.zeros(2, np.float32)})
    True
    """
    h = hashlib.sha256(b"qfl-model-v1")
    for name in sorted(weights, key=lambda s: s.encode("utf-8")):
        arr = np.asarray(weights[name], dtype=np.float32)
        raw = name.encode("utf-8")
        h.update(struct.pack("<II", len(raw), arr.ndim) + raw)
        h.update(struct.pack(f"<{arr.ndim}Q", *arr.shape))
        h.update(np.ascontiguousarray(arr + np.float32(0.0), dtype="<f4").tobytes())  # + 0.0 turns -0.0 into 0.0
    return h.digest()


def message_size(shapes_bits: Iterable[tuple[str, tuple[int, ...], int]], *, experiment: str, device: str,
                 msg_type: str = "update") -> int:
    """Exact encoded size of a message with tensors given as (name, shape, bits).

    108 + len(experiment) + len(device) bytes per update (UTF-8 lengths; 140
    for a model, whose Ed25519 signature is 32 bytes longer than an HMAC),
    plus 10 + 4 * ndim + len(name) + ceil(bits * count / 8) per tensor.

    >>> message_size([("w", (100,), 8)], experiment="e", device="d")
    225
    """
    trailer = MODEL_TRAILER_SIZE if msg_type == "model" else TRAILER_SIZE
    total = FIXED_HEADER_SIZE + len(experiment.encode("utf-8")) + len(device.encode("utf-8")) + trailer
    for name, shape, bits in shapes_bits:
        total += TENSOR_HEADER_SIZE + 4 * len(shape) + len(name.encode("utf-8"))
        total += packed_size(bits, math.prod(shape))
    return total


def encode_update(tensors: Iterable[QuantizedTensor], *, experiment: str, device: str, round: int,
                  base_hash: bytes, samples: int, key: bytes, kind: str = "difference",
                  nonce: bytes | None = None) -> bytes:
    """Encode and sign a device's update (``kind`` "difference" or "full").

    ``nonce`` None draws 16 random bytes (os.urandom); pass one only for test vectors.
    """
    msg = Message("update", experiment, device, round, base_hash, samples, kind, tuple(tensors),
                  os.urandom(NONCE_SIZE) if nonce is None else nonce)
    return encode_message(msg, key)


def encode_model(tensors: Iterable[QuantizedTensor], *, experiment: str, round: int, key: bytes,
                 samples: int = 0, sender: str = "basestation", nonce: bytes | None = None) -> bytes:
    """Encode a global-model message and sign it with the basestation's Ed25519 private ``key`` (32 bytes).

    Its hash is model_hash of the dequantized tensors.
    """
    tensors = tuple(tensors)
    msg = Message("model", experiment, sender, round, model_hash(dequantize(tensors)), samples, "full", tensors,
                  os.urandom(NONCE_SIZE) if nonce is None else nonce)
    return _serialize(msg, key)  # the hash was just computed from the tensors: no need to check it


def encode_message(message: Message, key: bytes) -> bytes:
    """Serialize ``message`` and sign it: an update with the HMAC ``key`` (at least 16 bytes), a model with
    the Ed25519 private ``key`` (32 bytes).

    A model message's ``base_hash`` must equal model_hash of its dequantized tensors.
    """
    if message.msg_type == "model" and model_hash(dequantize(message.tensors)) != message.base_hash:
        raise WireError("bad_model_hash", "a model message's base_hash must be model_hash of its dequantized tensors")
    return _serialize(message, key)


def _serialize(m: Message, key: bytes) -> bytes:
    model = m.msg_type == "model"
    if not model:
        _check_key(key)
    if m.msg_type not in MSG_TYPES:
        raise WireError("bad_type", f"msg_type must be one of {tuple(MSG_TYPES)}, got {m.msg_type!r}")
    if m.kind not in KINDS:
        raise WireError("bad_kind", f"kind must be one of {tuple(KINDS)}, got {m.kind!r}")
    experiment = _encode_name("experiment", m.experiment)
    device = _encode_name("device", m.device)
    _check_uint("round", m.round)
    _check_uint("samples", m.samples)
    _check_bytes("base_hash", m.base_hash, HASH_SIZE)
    _check_bytes("nonce", m.nonce, NONCE_SIZE)
    if len(m.tensors) > 65535:
        raise WireError("too_large", f"at most 65535 tensors per message, got {len(m.tensors)}")
    names = [_encode_name("tensor", t.name) for t in m.tensors]
    if len(set(names)) != len(names):
        raise WireError("bad_name", "tensor names must be unique within a message")
    parts = [b"", experiment, device]
    payloads = []
    for t, name in zip(m.tensors, names):
        if any(d > _U32_MAX for d in t.shape) or t.payload_size > _U32_MAX or len(t.shape) > 255:
            raise WireError("too_large", f"tensor {t.name!r} is too large for the format (u32 dims and length)")
        parts.append(_TENSOR.pack(len(name), t.bits, ROUNDING_CODES[t.rounding], len(t.shape), t.scale_exp,
                                  t.payload_size))
        parts.append(struct.pack(f"<{len(t.shape)}I", *t.shape))
        parts.append(name)
        payloads.append(_payload(t))
    body_size = sum(map(len, parts)) + sum(map(len, payloads))
    version = MODEL_VERSION if model else VERSION
    total = FIXED_HEADER_SIZE + body_size + trailer_size(version)
    if total > _U32_MAX:
        raise WireError("too_large", f"message of {total} bytes exceeds the u32 length field")
    parts[0] = _FIXED.pack(MAGIC, version, MSG_TYPES[m.msg_type], KINDS[m.kind], 0, total, m.round, m.samples,
                           len(m.tensors), len(experiment), len(device), m.base_hash, m.nonce)
    body = b"".join(parts + payloads)
    body += _CRC.pack(zlib.crc32(body))
    if model:
        from edge.wire.signing import sign

        return body + sign(key, body)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def signature_ok(data: bytes | bytearray | memoryview, key: bytes) -> bool:
    """True if the message's signature verifies under ``key``.

    Format version 2 (models): the last 64 bytes are the Ed25519 signature of
    everything before them, ``key`` the basestation's 32-byte public key.
    Otherwise (updates): the last 32 bytes are the HMAC-SHA256 of everything
    before them under ``key`` (constant-time comparison). False for data
    shorter than the signature. Raises WireError ("bad_field") only for a key
    of the wrong form.
    """
    view = memoryview(data).cast("B")
    if len(view) >= 5 and view[4] == MODEL_VERSION:
        from edge.wire.signing import verify

        if len(view) < SIGNATURE_SIZE:
            return False
        return verify(key, view[:-SIGNATURE_SIZE], bytes(view[-SIGNATURE_SIZE:]))
    _check_key(key)
    if len(view) < MAC_SIZE:
        return False
    expected = hmac.new(key, view[:-MAC_SIZE], hashlib.sha256).digest()
    return hmac.compare_digest(expected, bytes(view[-MAC_SIZE:]))


def read_header(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Check size, magic, version, declared length and CRC, and parse the fields before the tensor table.

    Cheap (no tensor is parsed): the basestation uses it to find the device
    whose key checks the signature. Raises WireError.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    if size > limits.max_message_bytes:
        raise WireError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    if size >= 4 and bytes(view[:4]) != MAGIC:
        raise WireError("bad_magic", f"expected magic {MAGIC!r}, got {bytes(view[:4])!r}")
    if size >= 5 and view[4] not in READABLE_VERSIONS:
        raise WireError("bad_version", f"format version {view[4]} is not one this reader reads {READABLE_VERSIONS}")
    trailer = trailer_size(view[4]) if size >= 5 else TRAILER_SIZE
    if size < FIXED_HEADER_SIZE + trailer:
        raise WireError("truncated", f"a message has at least {FIXED_HEADER_SIZE + trailer} bytes, got {size}")
    (_, version, type_code, kind_code, flags, total, round_, samples, count, exp_len, dev_len, base_hash,
     nonce) = _FIXED.unpack_from(view)
    if total != size:
        raise WireError("bad_length", f"header declares {total} bytes, the message has {size}")
    crc_at = size - trailer
    (crc,) = _CRC.unpack_from(view, crc_at)
    if zlib.crc32(view[:crc_at]) != crc:
        raise WireError("bad_crc", f"CRC32 {crc:08x} does not match the content ({zlib.crc32(view[:crc_at]):08x})")
    types = {code: name for name, code in MSG_TYPES.items()}
    kinds = {code: name for name, code in KINDS.items()}
    if type_code not in types:
        raise WireError("bad_type", f"message type code must be 1 (update) or 2 (model), got {type_code}")
    if version != (MODEL_VERSION if types[type_code] == "model" else VERSION):
        raise WireError("bad_version", f"a {types[type_code]} message has format version "
                                       f"{MODEL_VERSION if types[type_code] == 'model' else VERSION}, got {version}")
    if kind_code not in kinds:
        raise WireError("bad_kind", f"kind code must be 0 (difference) or 1 (full), got {kind_code}")
    if flags != 0:
        raise WireError("bad_field", f"flags must be 0, got {flags}")
    if count > limits.max_tensors:
        raise WireError("too_large", f"{count} tensors exceed the limit of {limits.max_tensors}")
    pos = FIXED_HEADER_SIZE
    if pos + exp_len + dev_len > crc_at:
        raise WireError("truncated", "experiment and device ids run past the end of the message")
    experiment = _decode_name("experiment", view[pos : pos + exp_len], limits)
    device = _decode_name("device", view[pos + exp_len : pos + exp_len + dev_len], limits)
    return Header(version, types[type_code], kinds[kind_code], experiment, device, round_, samples, base_hash,
                  nonce, count, total)


def decode_message(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS,
                   key: bytes | None = None) -> Message:
    """Decode a message, checking everything :func:`read_header` checks plus the tensors.

    With ``key``, the signature is checked too (reason "bad_signature"; an
    update's HMAC key, or the basestation's Ed25519 public key for a model). A model
    message's hash is recomputed and compared (reason "bad_model_hash").
    Every decoded value dequantizes to a finite float32.
    """
    view = memoryview(data).cast("B")
    head = read_header(view, limits=limits)
    if key is not None and not signature_ok(view, key):
        raise WireError("bad_signature", f"the signature does not verify with the given key (sender {head.device!r})")
    end = len(view) - trailer_size(head.version)
    pos = FIXED_HEADER_SIZE + len(head.experiment.encode("utf-8")) + len(head.device.encode("utf-8"))
    specs = []
    total_elements = 0
    names: set[str] = set()
    for index in range(head.tensor_count):
        if pos + TENSOR_HEADER_SIZE > end:
            raise WireError("truncated", f"tensor {index} header runs past the end of the message")
        name_len, bits, rounding_code, ndim, scale_exp, payload_len = _TENSOR.unpack_from(view, pos)
        pos += TENSOR_HEADER_SIZE
        if ndim > limits.max_ndim:
            raise WireError("bad_shape", f"tensor {index} has {ndim} dimensions, the limit is {limits.max_ndim}")
        if pos + 4 * ndim + name_len > end:
            raise WireError("truncated", f"tensor {index} dims and name run past the end of the message")
        shape = struct.unpack_from(f"<{ndim}I", view, pos)
        pos += 4 * ndim
        name = _decode_name("tensor", view[pos : pos + name_len], limits)
        pos += name_len
        if name in names:
            raise WireError("bad_name", f"tensor name {name!r} appears twice")
        names.add(name)
        if not 1 <= bits <= 32:
            raise WireError("bad_bits", f"tensor {name!r}: bits must be in 1..32, got {bits}")
        if rounding_code >= len(ROUNDINGS):
            raise WireError("bad_rounding", f"tensor {name!r}: rounding code must be 0..{len(ROUNDINGS) - 1}, "
                                            f"got {rounding_code}")
        rounding = ROUNDINGS[rounding_code]
        if rounding == "none" and bits != 32:
            raise WireError("bad_bits", f"tensor {name!r}: rounding 'none' (float32) needs bits 32, got {bits}")
        if rounding == "none" and scale_exp != 0:
            raise WireError("bad_scale", f"tensor {name!r}: rounding 'none' (float32) has scale exponent 0, "
                                         f"got {scale_exp}")
        if not MIN_SCALE_EXP <= scale_exp <= max_scale_exp(bits):
            raise WireError("bad_scale", f"tensor {name!r}: scale exponent must lie in "
                                         f"[{MIN_SCALE_EXP}, {max_scale_exp(bits)}] at {bits} bits, got {scale_exp}")
        count = math.prod(shape)
        if count > limits.max_tensor_elements:
            raise WireError("too_large", f"tensor {name!r} has {count} elements, the limit is "
                                         f"{limits.max_tensor_elements}")
        total_elements += count
        if total_elements > limits.max_total_elements:
            raise WireError("too_large", f"the tensors hold more than {limits.max_total_elements} elements")
        if payload_len != packed_size(bits, count):
            raise WireError("bad_length", f"tensor {name!r}: payload length {payload_len} should be "
                                          f"ceil({bits} * {count} / 8) = {packed_size(bits, count)}")
        specs.append((name, shape, bits, scale_exp, rounding, count, payload_len))
    payload_total = sum(spec[-1] for spec in specs)
    if pos + payload_total > end:
        raise WireError("truncated", f"payloads need {payload_total} bytes, {end - pos} remain")
    if pos + payload_total < end:
        raise WireError("trailing_data", f"{end - pos - payload_total} bytes after the last payload")
    tensors = []
    for name, shape, bits, scale_exp, rounding, count, payload_len in specs:
        chunk = view[pos : pos + payload_len]
        pos += payload_len
        if rounding == "none":
            values = np.frombuffer(chunk, dtype="<f4", count=count).astype(np.float32)
            if not np.isfinite(values).all():
                raise WireError("bad_value", f"tensor {name!r}: float32 payload holds NaN or inf")
        else:
            spare = 8 * payload_len - bits * count
            if spare and chunk[-1] >> (8 - spare):  # the padding must be zero: one encoding per message
                raise WireError("bad_padding", f"tensor {name!r}: the last {spare} padding bits are not zero")
            values = unpack_bits(chunk, bits, count)
        tensors.append(QuantizedTensor(name, shape, bits, scale_exp, rounding, values))
    message = Message(head.msg_type, head.experiment, head.device, head.round, head.base_hash, head.samples,
                      head.kind, tuple(tensors), head.nonce)
    if message.msg_type == "model" and model_hash(message.weights()) != message.base_hash:
        raise WireError("bad_model_hash", "the model's hash does not match the weights it carries")
    return message


def _payload(t: QuantizedTensor) -> bytes:
    if t.rounding == "none":
        return t.values.astype("<f4", copy=False).tobytes()
    return pack_bits(t.values, t.bits)


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_SIZE:
        raise WireError("bad_field", f"key must be bytes of at least {MIN_KEY_SIZE} bytes, "
                                     f"got {type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'}")


def _check_uint(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _U32_MAX:
        raise WireError("bad_field", f"{name} must be an integer in 0..{_U32_MAX}, got {value!r}")


def _check_bytes(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise WireError("bad_field", f"{name} must be {size} bytes, got {value!r:.80}")


def _encode_name(what: str, name: str) -> bytes:
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not raw or len(raw) > 255:
        raise WireError("bad_name", f"{what} name must be a str of 1..255 UTF-8 bytes, got {name!r:.80}")
    return raw


def _decode_name(what: str, raw: memoryview, limits: Limits) -> str:
    if not 1 <= len(raw) <= limits.max_name_length:
        raise WireError("bad_name", f"{what} name must have 1..{limits.max_name_length} bytes, got {len(raw)}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("bad_name", f"{what} name is not valid UTF-8: {bytes(raw)!r}") from None
