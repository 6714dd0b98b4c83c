"""An independent decoder written from docs/wire-format.md alone, against ``qfl inspect --json``.

Nothing from ``edge.wire`` is used to decode: only struct, zlib, hmac and
cryptography's Ed25519, following the page's tables (sections 1-4). The
messages are made by the code (the doc's vectors and a seeded variety:
every width, 1-bit, integer codes at 32 bits, raw float32, scalars, empty
tensors, no tensors, a global model); every field both decoders report must
agree, and so must the model hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import zlib

import numpy as np
import pytest

from edge.cli import main
from edge.wire import QuantizedTensor, encode_model, encode_update, model_hash
from edge.wire.signing import public_key

KEY = bytes(range(32))
ROUNDING = {0: "stochastic", 1: "nearest", 2: "none"}


def doc_unpack(data: bytes, n: int, count: int) -> list[int]:
    """Section 1: value i is stream bits [i*n, (i+1)*n), LSB first; stream bit p is bit p%8 of byte p//8."""
    out = []
    for i in range(count):
        v = 0
        for k in range(n):
            p = i * n + k
            v |= ((data[p // 8] >> (p % 8)) & 1) << k
        out.append(v - (1 << n) if v >> (n - 1) else v)  # two's complement
    return out


def doc_value(q: int, bits: int, e: int) -> np.float32:
    """Section 2, dequantizing: float64 q (2q + 1 at 1 bit) times 2^e exactly, then one rounding to float32."""
    x = float(2 * q + 1) if bits == 1 else float(q)
    return np.float32(math.ldexp(x, e))


def doc_decode(data: bytes, key: bytes) -> dict:
    """Sections 3 and 4: the fields ``qfl inspect --json`` reports, computed from the layout tables."""
    (magic, version, mtype, kind, flags, total, round_, samples, count, elen, dlen, base, nonce) = struct.unpack_from(
        "<4sBBBBIIIHBB32s16s", data, 0)
    assert magic == b"QFLW" and flags == 0 and total == len(data)
    sig_size = 64 if version == 2 else 32
    assert (mtype, version) in ((1, 1), (2, 2))
    crc_at = len(data) - 4 - sig_size
    assert struct.unpack_from("<I", data, crc_at)[0] == zlib.crc32(data[:crc_at])
    signed, sig = data[:-sig_size], data[-sig_size:]
    if version == 2:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, signed)
            signature = "verified"
        except InvalidSignature:
            signature = "FAILED"
    else:
        signature = "verified" if hmac.compare_digest(hmac.new(key, signed, hashlib.sha256).digest(), sig) else "FAILED"
    pos = 72
    experiment = data[pos:pos + elen].decode("utf-8")
    device = data[pos + elen:pos + elen + dlen].decode("utf-8")
    pos += elen + dlen
    entries = []
    for _ in range(count):
        name_len, bits, rounding, ndim, e, plen = struct.unpack_from("<BBBBhI", data, pos)
        shape = list(struct.unpack_from(f"<{ndim}I", data, pos + 10))
        name = data[pos + 10 + 4 * ndim:pos + 10 + 4 * ndim + name_len].decode("utf-8")
        entries.append((name, bits, ROUNDING[rounding], shape, e, plen, 10 + 4 * ndim + name_len))
        pos += 10 + 4 * ndim + name_len
    tensors, weights = [], {}
    for name, bits, rounding, shape, e, plen, header_bytes in entries:
        n_values = math.prod(shape)
        assert plen == (bits * n_values + 7) // 8
        chunk = data[pos:pos + plen]
        pos += plen
        entry = {"name": name, "shape": shape, "bits": bits, "rounding": rounding,
                 "scale_exp": None if rounding == "none" else e, "count": n_values, "payload_bytes": plen,
                 "header_bytes": header_bytes}
        if rounding == "none":
            codes = list(struct.unpack(f"<{n_values}f", chunk))
            values = np.array(codes, np.float32)
        else:
            codes = doc_unpack(chunk, bits, n_values)
            values = np.array([doc_value(q, bits, e) for q in codes], np.float32)
        entry["zeros"] = sum(1 for c in codes if c == 0)
        if n_values:
            entry["min"], entry["max"] = min(codes), max(codes)
            entry["value_min"], entry["value_max"] = float(values.min()), float(values.max())
        tensors.append(entry)
        weights[name] = values.reshape(shape)
    assert pos == crc_at
    return {
        "size": len(data),
        "header": {"type": {1: "update", 2: "model"}[mtype], "kind": {0: "difference", 1: "full"}[kind],
                   "version": version, "experiment": experiment, "device": device, "round": round_,
                   "samples": samples, "base_hash": base.hex(), "nonce": nonce.hex()},
        "signature": signature,
        "sizes": {"message_header": 72 + elen + dlen + 4 + sig_size,
                  "tensor_headers": sum(t["header_bytes"] for t in tensors),
                  "payloads": sum(t["payload_bytes"] for t in tensors), "values": sum(t["count"] for t in tensors)},
        "tensors": tensors,
        "_weights": weights,
    }


def doc_model_hash(weights: dict) -> bytes:
    """Section 3, "Model hash"."""
    h = hashlib.sha256(b"qfl-model-v1")
    for name in sorted(weights, key=lambda s: s.encode("utf-8")):
        arr = np.asarray(weights[name], np.float32)
        raw = name.encode("utf-8")
        h.update(struct.pack("<II", len(raw), arr.ndim) + raw + struct.pack(f"<{arr.ndim}Q", *arr.shape))
        h.update(b"".join(struct.pack("<f", 0.0 if v == 0 else float(v)) for v in arr.reshape(-1)))
    return h.digest()


def variety() -> list[tuple[str, bytes, bytes]]:
    rng = np.random.default_rng(14)
    out = []
    for bits in list(range(1, 33)):
        lo, hi = (-1, 0) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        e = int(rng.integers(-150, 128 - bits if bits > 1 else 128))
        codes = np.array([lo, hi, 0, *rng.integers(lo, hi + 1, 9)], np.int64)
        t = QuantizedTensor(f"t{bits}", (3, 4), bits, e, "nearest" if bits % 2 else "stochastic", codes)
        out.append((f"bits{bits}", encode_update([t], experiment="exp-é", device="pi-01", round=bits,
                                                 base_hash=rng.bytes(32), samples=bits * 7, key=KEY), KEY))
    raw = QuantizedTensor("raw", (2, 2), 32, 0, "none", np.array([[1.5, -0.0], [3e-42, -7.25]], np.float32))
    scalar = QuantizedTensor("s", (), 17, -3, "stochastic", np.array(-65536))
    empty = QuantizedTensor("c", (2, 0, 3), 5, 0, "nearest", np.zeros(0, np.int8))
    sub = QuantizedTensor("sub", (4,), 8, -150, "nearest", np.array([1, 2, 3, -128]))  # near the subnormals
    out.append(("mixed", encode_update([raw, scalar, empty, sub], experiment="e", device="d", round=0,
                                       base_hash=bytes(32), samples=0, key=KEY, kind="full"), KEY))
    out.append(("no tensors", encode_update([], experiment="e", device="d", round=1, base_hash=bytes(32),
                                            samples=1, key=KEY), KEY))
    out.append(("model", encode_model([raw, scalar, sub], experiment="e", round=3, key=KEY), public_key(KEY)))
    out.append(("wrong key", encode_update([scalar], experiment="e", device="d", round=1, base_hash=bytes(32),
                                           samples=1, key=KEY), bytes(32)))
    return out


@pytest.mark.parametrize("name,data,key", variety(), ids=[v[0] for v in variety()])
def test_the_doc_decoder_agrees_with_qfl_inspect(tmp_path, capsys, name, data, key) -> None:
    path = tmp_path / "msg.bin"
    path.write_bytes(data)
    status = main(["inspect", str(path), "--json", "--key", key.hex()])
    summary = json.loads(capsys.readouterr().out)
    mine = doc_decode(data, key)
    weights = mine.pop("_weights")
    summary.pop("file")
    assert mine == summary
    assert status == (1 if mine["signature"] == "FAILED" else 0)
    if mine["header"]["type"] == "model":
        assert doc_model_hash(weights).hex() == mine["header"]["base_hash"]
    assert doc_model_hash(weights) == model_hash(weights)
