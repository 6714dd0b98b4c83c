"""The update wire format: bit packing, uplink quantization, signed messages.

Spec with byte layouts and test vectors: ``docs/wire-format.md``. Pure
Python + numpy (hashlib, hmac, struct, zlib); no serial or MQTT code here.

Public API (everything below is importable from ``edge.wire``)
---------------------------------------------------------------

Bit packing (``edge.wire.bits``)::

    pack_bits(values: ArrayLike, n: int) -> bytes
        # n in 1..32; integer values in [-2**(n-1), 2**(n-1) - 1] (n-bit two's
        # complement). Value i takes stream bits [i*n, (i+1)*n), LSB first;
        # stream bit p is bit p % 8 of byte p // 8; last byte zero-padded.
    unpack_bits(data: bytes | bytearray | memoryview, n: int, count: int) -> np.ndarray
        # 1-D, sign-extended, dtype code_dtype(n); reads the first
        # packed_size(n, count) bytes of data (more is allowed, less is WireError).
    code_dtype(n: int) -> np.dtype    # int8 for n <= 8, int16 for n <= 16, int32 for n <= 32
    packed_size(n: int, count: int) -> int    # ceil(n * count / 8)

Uplink quantization (``edge.wire.uplink``)::

    SCHEMES = ("scaled", "kim2022")
    quantize_tensor(name: str, x: ArrayLike, m: int, rng: np.random.Generator | None,
                    *, scheme: str = "scaled", rounding: str = "stochastic") -> QuantizedTensor
    quantize_update(delta: Mapping[str, ArrayLike], m: int, rng: np.random.Generator | None,
                    *, scheme: str = "scaled", rounding: str = "stochastic") -> list[QuantizedTensor]
        # m in 1..32. m == 32 sends raw float32 (rounding "none"), scheme ignored.
        # "scaled": per-tensor power-of-two scale so the largest |x| fits m bits.
        # "kim2022": fixed step 2**-(m-1), clipped to [-1, 1 - 2**-(m-1)].
        # m == 1 is sign: code q in {-1, 0} means value (2q + 1) * 2**scale_exp.
        # rounding "stochastic" (unbiased; needs rng) or "nearest" (rng may be None).
        # ValueError for a bad m, scheme, rounding, missing rng or NaN/inf input.

Tensors (``edge.wire.tensor``)::

    dequantize_tensor(t: QuantizedTensor) -> np.ndarray           # float32, shape t.shape
    dequantize(tensors: Iterable[QuantizedTensor]) -> dict[str, np.ndarray]   # name -> float32

    @dataclass(frozen=True)
    QuantizedTensor(name: str, shape: tuple[int, ...], bits: int, scale_exp: int,
                    rounding: str, values: np.ndarray)
        # rounding in ("stochastic", "nearest", "none"); "none" means bits == 32 and
        # values are raw float32; otherwise values are integer codes (stored with
        # dtype code_dtype(bits), shape `shape`), value = q * 2**scale_exp.
        # .count -> int (elements), .payload_size -> int (ceil(bits * count / 8))
        # Shapes may have zero-size dimensions; scale_exp in [-200, 128 - bits]
        # (127 at 1 bit) so every value dequantizes to a finite float32.

Messages (``edge.wire.message``)::

    @dataclass(frozen=True)
    Message(msg_type: str, experiment: str, device: str, round: int, base_hash: bytes,
            samples: int, kind: str, tensors: tuple[QuantizedTensor, ...], nonce: bytes)
        # msg_type "update" (device -> basestation) or "model" (global model,
        # basestation -> devices; device is the sender id, base_hash is the
        # model's own hash). kind "difference" or "full". base_hash 32 bytes,
        # nonce 16 bytes. Equality compares every field and every value.
        # .weights() -> dict[str, np.ndarray]   (dequantize(self.tensors))
        # .payload_bytes -> int

    @dataclass(frozen=True)
    Limits(max_message_bytes: int = 64 * 2**20, max_tensors: int = 1024,
           max_tensor_elements: int = 2**24, max_total_elements: int = 2**25,
           max_name_length: int = 255, max_ndim: int = 8)
    DEFAULT_LIMITS = Limits()

    encode_update(tensors: Iterable[QuantizedTensor], *, experiment: str, device: str,
                  round: int, base_hash: bytes, samples: int, key: bytes,
                  kind: str = "difference", nonce: bytes | None = None) -> bytes
    encode_model(tensors: Iterable[QuantizedTensor], *, experiment: str, round: int,
                 key: bytes, samples: int = 0, sender: str = "basestation",
                 nonce: bytes | None = None) -> bytes
        # base_hash = model_hash(dequantize(tensors)); kind "full".
        # nonce None -> 16 random bytes from os.urandom (pass one only for test vectors).
        # key: bytes, at least 16. Bad arguments raise WireError too.
    encode_message(message: Message, key: bytes) -> bytes
    decode_message(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS,
                   key: bytes | None = None) -> Message
        # Raises WireError (reason "truncated", "too_large", "bad_magic",
        # "bad_version", "bad_length", "bad_crc", "bad_signature" (only when key
        # is given), "bad_type", "bad_kind", "bad_bits", "bad_rounding",
        # "bad_shape", "bad_name", "bad_scale", "bad_model_hash", "bad_value"
        # (NaN/inf in a float32 payload), "bad_padding", "bad_field", "trailing_data").
    read_header(data, *, limits: Limits = DEFAULT_LIMITS) -> Header
        # Header(version, msg_type, kind, experiment, device, round, samples,
        # base_hash, nonce, tensor_count, total_length): checks sizes, magic,
        # version, length and CRC, parses no tensor; use it to look up the key.
    signature_ok(data: bytes | bytearray | memoryview, key: bytes) -> bool
        # HMAC-SHA256 over every byte before the last 32, constant-time compare.
    model_hash(weights: Mapping[str, ArrayLike]) -> bytes
        # 32-byte SHA-256 of the float32 weights, names sorted; -0.0 hashes as 0.0.
    message_size(shapes_bits: Iterable[tuple[str, tuple[int, ...], int]], *,
                 experiment: str, device: str) -> int
        # exact encoded size: header + per-tensor headers + payloads.

Verification for the basestation (``edge.wire.verify``)::

    @dataclass(frozen=True)
    Verdict(reason: str, detail: str = "", message: Message | None = None,
            wire_reason: str | None = None, header: Header | None = None)
        # reason: "ok", "malformed" (wire_reason = the WireError reason),
        # "unknown_device", "forged", "wrong_experiment", "stale_round" (an update
        # for an earlier or a later round), "wrong_base", "replayed".
        # .accepted -> bool (reason == "ok"); message is set only when accepted;
        # header is whatever could be read (claimed device id) even when rejected.
        # Order of checks: malformed header, unknown_device, forged, malformed
        # tensors, replayed, wrong_experiment, stale_round, wrong_base.
    verify_update(data, *, experiment: str, round: int, base_hash: bytes,
                  key: bytes | Callable[[str], bytes | None], seen_nonces: Container[bytes],
                  limits: Limits = DEFAULT_LIMITS) -> Verdict
        # Pure: never raises for bad data, never adds to seen_nonces (the caller
        # records verdict.message.nonce once it has stored the update).
    verify_model(data, *, experiment: str, key: bytes, round: int | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> Verdict
    VERDICT_REASONS = ("ok", "malformed", "unknown_device", "forged", "replayed",
                       "wrong_experiment", "stale_round", "wrong_base")

Errors (``edge.wire.errors``)::

    class WireError(ValueError): .reason -> str    # codes listed in REASONS

Example::

    import numpy as np
    from edge.wire import quantize_update, encode_update, verify_update, dequantize
    tensors = quantize_update(result.delta, 8, np.random.default_rng(seed))
    data = encode_update(tensors, experiment="exp1", device="pi-03", round=4,
                         base_hash=model_msg.base_hash, samples=512, key=device_key)
    verdict = verify_update(data, experiment="exp1", round=4, base_hash=model_msg.base_hash,
                            key=keys.get, seen_nonces=seen)
    if verdict.accepted:
        delta = dequantize(verdict.message.tensors)
"""

from edge.wire.bits import code_dtype, pack_bits, packed_size, unpack_bits
from edge.wire.errors import REASONS, WireError
from edge.wire.message import (
    DEFAULT_LIMITS,
    Header,
    Limits,
    Message,
    decode_message,
    encode_message,
    encode_model,
    encode_update,
    message_size,
    model_hash,
    read_header,
    signature_ok,
)
from edge.wire.tensor import QuantizedTensor, dequantize, dequantize_tensor
from edge.wire.uplink import SCHEMES, quantize_tensor, quantize_update
from edge.wire.verify import VERDICT_REASONS, Verdict, check_signed_update, verify_model, verify_update

__all__ = [
    "DEFAULT_LIMITS",
    "REASONS",
    "SCHEMES",
    "VERDICT_REASONS",
    "Header",
    "Limits",
    "Message",
    "QuantizedTensor",
    "Verdict",
    "WireError",
    "code_dtype",
    "decode_message",
    "dequantize",
    "dequantize_tensor",
    "encode_message",
    "encode_model",
    "encode_update",
    "message_size",
    "model_hash",
    "pack_bits",
    "packed_size",
    "quantize_tensor",
    "quantize_update",
    "read_header",
    "signature_ok",
    "unpack_bits",
    "verify_model",
    "verify_update",
    "check_signed_update",
]
