"""Fuzzing the decoder: mutated, truncated and tampered messages never crash it.

Every mutant either decodes to the identical message or raises WireError;
nothing else escapes, and the memory the decoder allocates stays bounded by
the Limits it was given (checked with tracemalloc over the whole loop).
Half of the mutants get a fresh CRC and HMAC (and half of those a total
length that matches their new size), so the mutation reaches the parser
instead of stopping at the checksum or the length check; for those, a mutant that decodes
must be a valid message in its own right, i.e. re-encode to the same bytes
(the format has exactly one encoding per message).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import tracemalloc
import zlib

import numpy as np

from edge.wire import (
    Limits,
    QuantizedTensor,
    WireError,
    decode_message,
    encode_message,
    encode_model,
    encode_update,
    quantize_update,
    verify_update,
)
from edge.wire.signing import public_key, sign

KEY = b"fuzzing key, 32 bytes long......"  # devices' HMAC key, and the basestation's Ed25519 private key
PUB = public_key(KEY)


def check_key(data: bytes) -> bytes:
    """The key that checks a message: the public key for format version 2 (models), else the HMAC key."""
    return PUB if len(data) > 4 and data[4] == 2 else KEY
LIMITS = Limits(max_message_bytes=8192, max_tensors=16, max_tensor_elements=2048, max_total_elements=4096,
                max_name_length=32, max_ndim=4)
MUTANTS = 10_000
# Generous bound on the decoder's peak allocation under LIMITS: the unpacked
# codes and their temporaries are a few times 8 bytes per element (at most
# 4096 elements), plus copies of a message of at most 8 KiB. An unchecked
# size field (up to 2**32 elements) would blow far past it.
PEAK_BYTES = 1 << 20


def reseal(data: bytes, fix_length: bool = False) -> bytes:
    """Fresh CRC32 and HMAC; with fix_length also a total-length field that matches the new size."""
    if len(data) < 72 + 36:
        return data
    if fix_length:
        data = data[:8] + struct.pack("<I", len(data)) + data[12:]
    if data[4] == 2 and len(data) >= 72 + 68:  # a model: Ed25519 after the CRC
        body = data[:-68]
        body += struct.pack("<I", zlib.crc32(body))
        return body + sign(KEY, body)
    body = data[:-36]
    body += struct.pack("<I", zlib.crc32(body))
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


def base_messages() -> list[bytes]:
    rng = np.random.default_rng(2024)
    delta = {
        "0.weight": rng.standard_normal((8, 12)).astype(np.float32) * 0.01,
        "0.bias": rng.standard_normal(8).astype(np.float32) * 0.01,
        "2.weight": rng.standard_normal((3, 8)).astype(np.float32),
    }
    base = hashlib.sha256(b"model").digest()
    out = []
    for m, scheme in ((3, "scaled"), (1, "scaled"), (8, "kim2022"), (13, "scaled"), (32, "scaled")):
        tensors = quantize_update(delta, m, rng, scheme=scheme)
        out.append(encode_update(tensors, experiment="fuzz", device=f"pi-{m:02d}", round=m, base_hash=base,
                                 samples=100 + m, key=KEY, nonce=rng.bytes(16)))
    mixed = [QuantizedTensor("c", (2, 0, 3), 5, 0, "nearest", np.zeros(0, np.int8)),
             QuantizedTensor("s", (), 17, -3, "stochastic", np.array(-65536))]
    out.append(encode_model(mixed, experiment="fuzz", round=9, key=KEY, nonce=rng.bytes(16)))
    out.append(encode_update([], experiment="fuzz", device="pi-00", round=0, base_hash=base, samples=0,
                             key=KEY, kind="full", nonce=rng.bytes(16)))
    return out


def size_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every length, count and dimension field of a valid message."""
    fields = [(8, "<I"), (20, "<H"), (22, "<B"), (23, "<B")]
    pos = 72 + data[22] + data[23]
    for _ in range(struct.unpack_from("<H", data, 20)[0]):
        name_len, ndim = data[pos], data[pos + 3]
        fields += [(pos, "<B"), (pos + 1, "<B"), (pos + 3, "<B"), (pos + 6, "<I")]
        fields += [(pos + 10 + 4 * k, "<I") for k in range(ndim)]
        pos += 10 + 4 * ndim + name_len
    return fields


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    raw = bytearray(data)
    op = int(rng.integers(6))
    if op == 0:  # flip 1 to 3 bits
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(len(raw) * 8))
            raw[p // 8] ^= 1 << (p % 8)
    elif op == 1:  # overwrite a few bytes
        for _ in range(int(rng.integers(1, 4))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
    elif op == 2:  # truncate
        del raw[int(rng.integers(len(raw))):]
    elif op == 3:  # insert bytes
        p = int(rng.integers(len(raw) + 1))
        raw[p:p] = rng.bytes(int(rng.integers(1, 9)))
    elif op == 4:  # delete bytes
        p = int(rng.integers(len(raw)))
        del raw[p : p + int(rng.integers(1, 9))]
    else:  # tamper with a length, count or dimension field
        offset, fmt = size_fields(data)[int(rng.integers(len(size_fields(data))))]
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        old = struct.unpack_from(fmt, raw, offset)[0]
        choice = [0, 1, top, top - 1, old + 1, max(old - 1, 0), int(rng.integers(top + 1))][int(rng.integers(7))]
        struct.pack_into(fmt, raw, offset, min(choice, top))
    return bytes(raw)


def test_mutated_messages_decode_identically_or_raise_wire_error():
    rng = np.random.default_rng(12345)
    bases = base_messages()
    originals = [decode_message(b, key=check_key(b), limits=LIMITS) for b in bases]
    reasons: dict[str, int] = {}
    identical = canonical = 0
    tracemalloc.start()
    try:
        for i in range(MUTANTS):
            which = i % len(bases)
            sealed = i % 2 == 1
            mutant = mutate(bases[which], rng)
            if sealed:
                mutant = reseal(mutant, fix_length=i % 4 == 1)
            try:
                msg = decode_message(mutant, key=check_key(mutant), limits=LIMITS)
            except WireError as exc:
                reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
                continue
            if mutant == bases[which]:
                assert msg == originals[which]
                identical += 1
            else:
                # Only a resealed mutant can be another valid message, and then it has one encoding.
                assert sealed, f"mutant {i} decoded without a valid signature"
                assert encode_message(msg, KEY) == mutant
                canonical += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"decoder peak allocation {peak} bytes"
    assert sum(reasons.values()) + identical + canonical == MUTANTS
    # The mutations reach deep into the parser, not only the checksums.
    for reason in ("bad_crc", "truncated", "bad_length", "too_large", "bad_shape", "bad_name", "bad_bits",
                   "bad_padding", "trailing_data"):
        assert reasons.get(reason, 0) > 0, (reason, reasons)


def test_verify_update_never_raises_on_mutants():
    rng = np.random.default_rng(777)
    bases = base_messages()
    seen: set[bytes] = set()
    verdicts: dict[str, int] = {}
    for i in range(2000):
        mutant = mutate(bases[i % len(bases)], rng)
        if i % 2:
            mutant = reseal(mutant)
        verdict = verify_update(mutant, experiment="fuzz", round=3, base_hash=hashlib.sha256(b"model").digest(),
                                key={"pi-03": KEY}.get, seen_nonces=seen, limits=LIMITS)
        verdicts[verdict.reason] = verdicts.get(verdict.reason, 0) + 1
        assert verdict.accepted == (verdict.message is not None)
    assert {"malformed", "unknown_device", "stale_round"} <= set(verdicts), verdicts
