"""Uplink quantization, message encode/decode, and basestation verification."""

from __future__ import annotations

import math
import struct
import zlib
import hashlib
import hmac

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.wire.signing import public_key, sign
from edge.wire import (
    Limits,
    Message,
    QuantizedTensor,
    WireError,
    decode_message,
    dequantize,
    encode_message,
    encode_model,
    encode_update,
    message_size,
    model_hash,
    quantize_tensor,
    quantize_update,
    read_header,
    signature_ok,
    verify_model,
    verify_update,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
PUB, OTHER_PUB = public_key(KEY), public_key(OTHER_KEY)  # models: KEY is the Ed25519 private key
BASE = hashlib.sha256(b"global model of round 7").digest()
NONCE = bytes(range(16))
DERANDOMIZED = settings(derandomize=True, max_examples=150, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


def reseal(data: bytes, key: bytes = KEY) -> bytes:
    """Recompute the CRC32 and signature of an edited message (HMAC for an update, Ed25519 with ``key`` as the
    private key for a model, format version 2), so the edit reaches the parser."""
    if data[4] == 2:
        body = data[:-68]
        body += struct.pack("<I", zlib.crc32(body))
        return body + sign(key, body)
    body = data[:-36]
    body += struct.pack("<I", zlib.crc32(body))
    return body + hmac.new(key, body, hashlib.sha256).digest()


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    raw = bytearray(data)
    struct.pack_into(fmt, raw, offset, value)
    return reseal(bytes(raw))


def sample_tensors() -> list[QuantizedTensor]:
    rng = np.random.default_rng(7)
    return [
        QuantizedTensor("0.weight", (3, 5), 3, -4, "stochastic", rng.integers(-4, 4, (3, 5))),
        QuantizedTensor("0.bias", (3,), 8, -9, "nearest", np.array([-128, 0, 127])),
        QuantizedTensor("2.weight", (2, 2), 32, 0, "none", np.array([[0.5, -1.25], [3e-8, -0.0]], np.float32)),
    ]


def sample_update(**overrides) -> bytes:
    fields = dict(experiment="exp-1", device="pi-01", round=7, base_hash=BASE, samples=321, key=KEY, nonce=NONCE)
    fields.update(overrides)
    return encode_update(sample_tensors(), **fields)


# Offsets from docs/wire-format.md (written out here so the test checks the layout, not the code's constants).
TYPE, KIND, FLAGS, TOTAL, COUNT, EXP_LEN = 5, 6, 7, 8, 20, 22
TABLE = 72 + len("exp-1") + len("pi-01")  # first tensor entry: name len, bits, rounding, ndim, scale, payload len


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("m", [2, 3, 4, 8, 12, 16, 24, 31])
def test_scaled_exponent_is_the_smallest_that_fits(m):
    rng = np.random.default_rng(m)
    qmax = 2 ** (m - 1) - 1
    for scale in (1e-6, 0.013, 1.0, 250.0):
        x = (rng.standard_normal(200) * scale).astype(np.float32)
        t = quantize_tensor("w", x, m, rng)
        peak = float(np.max(np.abs(x.astype(np.float64))))
        assert peak <= qmax * 2.0 ** t.scale_exp
        assert peak > qmax * 2.0 ** (t.scale_exp - 1)
        assert t.values.min() >= -qmax and t.values.max() <= qmax


@pytest.mark.parametrize("scheme,m", [("scaled", 1), ("scaled", 3), ("scaled", 8), ("kim2022", 1), ("kim2022", 4)])
def test_stochastic_rounding_is_unbiased(scheme, m):
    x = np.array([0.3, -0.71, 0.05, -0.999, 0.0, 0.5], np.float32)
    rng = np.random.default_rng(11)
    draws = 4000
    total = np.zeros(x.shape)
    steps = set()
    for _ in range(draws):
        t = quantize_tensor("w", x, m, rng, scheme=scheme)
        total += dequantize([t])["w"]
        steps.add(t.scale_exp)
    (exp,) = steps
    step = 2.0 * 2.0**exp if m == 1 else 2.0**exp  # distance between neighbouring grid points
    sigma = step / 2 / math.sqrt(draws)  # per-draw error std is at most step / 2
    assert np.all(np.abs(total / draws - x) < 5 * sigma)


@pytest.mark.parametrize("m", [2, 5, 8, 16])
def test_rounding_error_is_below_one_step(m):
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, 1000).astype(np.float32)  # inside the kim2022 range at every m >= 2
    for scheme in ("scaled", "kim2022"):
        stoch = quantize_tensor("w", x, m, rng, scheme=scheme)
        near = quantize_tensor("w", x, m, None, scheme=scheme, rounding="nearest")
        step = 2.0**stoch.scale_exp
        assert np.max(np.abs(dequantize([stoch])["w"] - x)) < step
        assert np.max(np.abs(dequantize([near])["w"] - x)) <= step / 2 + 1e-7


def test_kim2022_grid_is_fixed_and_clipped():
    t = quantize_tensor("w", [1.5, -3.0, 0.25, -0.125, 0.3], 4, None, scheme="kim2022", rounding="nearest")
    assert t.scale_exp == -3  # step 2**-(m-1)
    assert t.values.tolist() == [7, -8, 2, -1, 2]
    assert dequantize([t])["w"].tolist() == [0.875, -1.0, 0.25, -0.125, 0.25]
    sign = quantize_tensor("w", [0.2, -0.2, 5.0], 1, None, scheme="kim2022", rounding="nearest")
    assert dequantize([sign])["w"].tolist() == [1.0, -1.0, 1.0]


def test_kim2022_sends_small_updates_as_zero_where_scaled_does_not():
    x = np.full(100, 0.01, np.float32)
    kim = quantize_tensor("w", x, 4, None, scheme="kim2022", rounding="nearest")
    scaled = quantize_tensor("w", x, 4, None, scheme="scaled", rounding="nearest")
    assert not kim.values.any()
    assert np.allclose(dequantize([scaled])["w"], x, rtol=0.1)


def test_one_bit_is_the_sign_grid():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(50).astype(np.float32)
    t = quantize_tensor("w", x, 1, rng)
    deq = dequantize([t])["w"]
    assert set(np.abs(deq).tolist()) == {2.0**t.scale_exp}
    assert 2.0**t.scale_exp >= np.max(np.abs(x)) > 2.0 ** (t.scale_exp - 1)
    near = quantize_tensor("w", x, 1, None, rounding="nearest")
    assert np.array_equal(np.sign(dequantize([near])["w"]), np.where(x >= 0, 1.0, -1.0))


def test_32_bits_send_raw_float32():
    x = np.array([[1e-30, -3.5], [np.pi, 7e20]], np.float32)
    for scheme in ("scaled", "kim2022"):
        t = quantize_tensor("w", x, 32, None, scheme=scheme)
        assert (t.bits, t.rounding, t.scale_exp) == (32, "none", 0)
        assert dequantize([t])["w"].tobytes() == x.tobytes()


def test_zero_tensor():
    t = quantize_tensor("w", np.zeros(5, np.float32), 4, np.random.default_rng(0))
    assert not t.values.any() and not dequantize([t])["w"].any()
    s = quantize_tensor("w", np.zeros(5, np.float32), 1, np.random.default_rng(0))
    assert not dequantize([s])["w"].any()  # +-2**-200 is float32 zero


def test_quantize_update_is_seeded_and_keeps_order():
    delta = {"b": np.linspace(-1, 1, 30, dtype=np.float32), "a": np.ones((2, 3), np.float32)}
    one = quantize_update(delta, 5, np.random.default_rng(42))
    two = quantize_update(delta, 5, np.random.default_rng(42))
    other = quantize_update(delta, 5, np.random.default_rng(43))
    assert [t.name for t in one] == ["b", "a"]
    assert one == two and one != other


def test_quantize_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tensor '0.weight' has 1 non-finite values"):
        quantize_tensor("0.weight", [0.0, np.nan], 8, rng)
    with pytest.raises(ValueError, match="unknown uplink scheme 'log'"):
        quantize_tensor("w", [0.0], 8, rng, scheme="log")
    with pytest.raises(ValueError, match="needs a seeded numpy.random.Generator"):
        quantize_tensor("w", [0.0], 8, None)
    with pytest.raises(ValueError, match="uplink bits m must be an integer in 1..32, got 33"):
        quantize_tensor("w", [0.0], 33, rng)
    with pytest.raises(ValueError, match="unknown rounding 'none'"):
        quantize_tensor("w", [0.0], 8, rng, rounding="none")


# ---------------------------------------------------------------- tensors and messages


def test_quantized_tensor_checks_its_fields():
    with pytest.raises(WireError, match=r"3-bit codes must lie in \[-4, 3\], got 4") as err:
        QuantizedTensor("w", (2,), 3, 0, "nearest", np.array([0, 4]))
    assert err.value.reason == "bad_value"
    with pytest.raises(WireError, match=r"shape \(2, 2\) holds 4 values, got 3"):
        QuantizedTensor("w", (2, 2), 8, 0, "nearest", np.array([0, 1, 2]))
    with pytest.raises(WireError, match="rounding 'none' .* needs bits 32"):
        QuantizedTensor("w", (1,), 16, 0, "none", np.zeros(1, np.float32))
    with pytest.raises(WireError, match="must be finite"):
        QuantizedTensor("w", (1,), 32, 0, "none", np.array([np.inf], np.float32))
    with pytest.raises(WireError, match=r"scale_exp must lie in \[-200, 120\] at 8 bits, got 121"):
        QuantizedTensor("w", (1,), 8, 121, "nearest", np.zeros(1, np.int8))
    with pytest.raises(WireError, match="codes must be integers"):
        QuantizedTensor("w", (1,), 8, 0, "nearest", np.zeros(1))


def test_round_trip_of_a_sample_update():
    data = sample_update()
    msg = decode_message(data, key=KEY)
    assert msg == Message("update", "exp-1", "pi-01", 7, BASE, 321, "difference", tuple(sample_tensors()), NONCE)
    assert encode_message(msg, KEY) == data
    assert msg.weights()["2.weight"].tobytes() == sample_tensors()[2].values.tobytes()


def test_size_is_header_plus_packed_payloads():
    tensors = sample_tensors()
    data = sample_update()
    header = 108 + len("exp-1") + len("pi-01")
    per_tensor = sum(10 + 4 * len(t.shape) + len(t.name) for t in tensors)
    payloads = math.ceil(3 * 15 / 8) + 3 + 4 * 4
    assert len(data) == header + per_tensor + payloads
    assert len(data) == message_size([(t.name, t.shape, t.bits) for t in tensors], experiment="exp-1", device="pi-01")


@pytest.mark.parametrize("m", [1, 3, 8, 13, 32])
def test_size_of_a_100k_parameter_update(m):
    x = np.random.default_rng(m).standard_normal(100_000).astype(np.float32)
    tensors = quantize_update({"0.weight": x.reshape(1000, 100)}, m, np.random.default_rng(0))
    data = encode_update(tensors, experiment="e", device="d", round=0, base_hash=BASE, samples=1, key=KEY)
    assert len(data) == math.ceil(m * 100_000 / 8) + (108 + 2) + (10 + 4 * 2 + len("0.weight"))


def tensor_strategy(name: str):
    def build(args):
        shape, bits, rounding, seed = args
        count = math.prod(shape)
        rng = np.random.default_rng(seed)
        if bits == 32 and rounding == "none":
            values = rng.standard_normal(count).astype(np.float32)
            return QuantizedTensor(name, shape, 32, 0, "none", values)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
        values = rng.integers(lo, hi, count)
        if count:
            values[0] = lo
            values[-1] = hi - 1
        return QuantizedTensor(name, shape, bits, int(rng.integers(-200, 128 - bits)), rounding, values)

    shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
    return st.tuples(shapes, st.integers(1, 32), st.sampled_from(["stochastic", "nearest", "none"]),
                     st.integers(0, 2**32 - 1)).map(
        lambda a: a if a[2] != "none" else (a[0], 32, "none", a[3])).map(build)


messages = st.integers(0, 5).flatmap(
    lambda k: st.tuples(*[tensor_strategy(f"layer{i}.w") for i in range(k)])).flatmap(
    lambda tensors: st.builds(
        Message,
        msg_type=st.just("update"),
        experiment=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 255),
        device=st.text(min_size=1, max_size=20),
        round=st.integers(0, 2**32 - 1),
        base_hash=st.binary(min_size=32, max_size=32),
        samples=st.integers(0, 2**32 - 1),
        kind=st.sampled_from(["difference", "full"]),
        tensors=st.just(tensors),
        nonce=st.binary(min_size=16, max_size=16),
    ))


@DERANDOMIZED
@given(messages)
def test_update_round_trip_property(msg):
    data = encode_message(msg, KEY)
    assert len(data) == message_size([(t.name, t.shape, t.bits) for t in msg.tensors],
                                     experiment=msg.experiment, device=msg.device)
    assert decode_message(data, key=KEY) == msg
    assert decode_message(data) == msg  # no key: structure and CRC only


@DERANDOMIZED
@given(messages)
def test_model_round_trip_property(msg):
    data = encode_model(msg.tensors, experiment=msg.experiment, round=msg.round, key=KEY, samples=msg.samples,
                        sender=msg.device, nonce=msg.nonce)
    decoded = decode_message(data, key=PUB)
    assert decoded.msg_type == "model" and decoded.kind == "full"
    assert decoded.tensors == msg.tensors
    assert decoded.base_hash == model_hash(dequantize(msg.tensors))


def test_model_message_carries_its_own_hash():
    tensors = sample_tensors()
    data = encode_model(tensors, experiment="exp-1", round=8, key=KEY, nonce=NONCE)
    msg = decode_message(data, key=PUB)
    assert msg.device == "basestation"
    assert msg.base_hash == model_hash(msg.weights())
    # An update is relative to exactly that hash.
    update = encode_update(tensors, experiment="exp-1", device="pi-01", round=8, base_hash=msg.base_hash,
                           samples=5, key=OTHER_KEY)
    assert decode_message(update).base_hash == msg.base_hash
    # A model whose weights do not match its hash is rejected, on both sides.
    tampered = bytearray(data)
    tampered[-69] ^= 0x01  # last payload byte (a float32 mantissa bit), before the CRC and 64-byte signature
    with pytest.raises(WireError) as err:
        decode_message(reseal(bytes(tampered)))
    assert err.value.reason == "bad_model_hash"
    with pytest.raises(WireError, match="base_hash must be model_hash"):
        encode_message(Message("model", "e", "bs", 1, BASE, 0, "full", tuple(tensors), NONCE), KEY)


def test_read_header_and_signature():
    data = sample_update()
    head = read_header(data)
    assert (head.version, head.msg_type, head.kind, head.experiment, head.device, head.round, head.samples,
            head.base_hash, head.nonce, head.tensor_count, head.total_length) == (
        1, "update", "difference", "exp-1", "pi-01", 7, 321, BASE, NONCE, 3, len(data))
    assert signature_ok(data, KEY)
    assert not signature_ok(data, OTHER_KEY)
    assert not signature_ok(data[:10], KEY)
    with pytest.raises(WireError) as err:
        decode_message(data, key=OTHER_KEY)
    assert err.value.reason == "bad_signature"


def payload_offset(data: bytes) -> int:
    """Offset of the first payload: after the table of the three sample tensors."""
    return TABLE + sum(10 + 4 * len(t.shape) + len(t.name) for t in sample_tensors())


MALFORMED = [
    ("too_large", lambda d: d, Limits(max_message_bytes=100)),
    ("bad_magic", lambda d: b"QFLX" + d[4:], None),
    ("bad_version", lambda d: d[:4] + b"\x03" + d[5:], None),
    ("truncated", lambda d: d[:60], None),
    ("bad_length", lambda d: d[:-1], None),
    ("bad_length", lambda d: d + b"\x00", None),
    ("bad_crc", lambda d: d[:100] + bytes([d[100] ^ 4]) + d[101:], None),
    ("bad_type", lambda d: patch(d, TYPE, "<B", 3), None),
    ("bad_kind", lambda d: patch(d, KIND, "<B", 2), None),
    ("bad_field", lambda d: patch(d, FLAGS, "<B", 1), None),
    ("too_large", lambda d: d, Limits(max_tensors=2)),
    ("truncated", lambda d: patch(sample_update_without_tensors(), COUNT, "<H", 1), None),
    ("bad_name", lambda d: patch(d, EXP_LEN, "<B", 0), None),
    ("truncated", lambda d: patch(d, EXP_LEN, "<B", 255), None),
    ("bad_name", lambda d: patch(d, 72, "<B", 0xFF), None),  # not UTF-8
    ("bad_name", lambda d: d, Limits(max_name_length=4)),
    ("bad_bits", lambda d: patch(d, TABLE + 1, "<B", 0), None),
    ("bad_bits", lambda d: patch(d, TABLE + 1, "<B", 33), None),
    ("bad_rounding", lambda d: patch(d, TABLE + 2, "<B", 3), None),
    ("bad_bits", lambda d: patch(d, TABLE + 2, "<B", 2), None),  # rounding none at 3 bits
    ("bad_shape", lambda d: d, Limits(max_ndim=1)),
    ("truncated", lambda d: patch(d, TABLE + 3, "<B", 200), Limits(max_ndim=255)),
    ("bad_scale", lambda d: patch(d, TABLE + 4, "<h", 126), None),
    ("bad_scale", lambda d: patch(d, TABLE + 4, "<h", -201), None),
    ("bad_length", lambda d: patch(d, TABLE + 6, "<I", 7), None),
    ("too_large", lambda d: patch(d, TABLE + 10, "<I", 2**32 - 1), None),
    ("too_large", lambda d: d, Limits(max_tensor_elements=14)),
    ("too_large", lambda d: d, Limits(max_total_elements=21)),
    ("truncated", lambda d: patch(patch(d, TABLE + 10, "<I", 30), TABLE + 6, "<I", 57), None),
    ("trailing_data", lambda d: patch(patch(d, TABLE + 10, "<I", 2), TABLE + 6, "<I", 4), None),
    ("bad_padding", lambda d: patch(d, payload_offset(d) + 5, "<B", d[payload_offset(d) + 5] | 0x80), None),
    ("bad_value", lambda d: patch(d, len(d) - 40, "<f", float("nan")), None),
]


@pytest.mark.parametrize("reason,mutate,limits", MALFORMED)
def test_each_malformation_has_its_reason(reason, mutate, limits):
    data = mutate(sample_update())
    with pytest.raises(WireError) as err:
        decode_message(data, limits=limits or Limits())
    assert err.value.reason == reason, str(err.value)


def sample_update_without_tensors() -> bytes:
    return encode_update([], experiment="exp-1", device="pi-01", round=7, base_hash=BASE, samples=0, key=KEY,
                         nonce=NONCE)


def test_duplicate_names_are_rejected():
    tensors = sample_tensors()
    twin = QuantizedTensor("0.bias", (2,), 4, 0, "nearest", np.array([1, 2]))
    with pytest.raises(WireError, match="unique"):
        encode_update(tensors + [twin], experiment="e", device="d", round=0, base_hash=BASE, samples=0, key=KEY)
    pair = [QuantizedTensor(name, (1,), 8, 0, "nearest", np.array([1])) for name in ("w-a", "w-b")]
    data = encode_update(pair, experiment="e", device="d", round=0, base_hash=BASE, samples=0, key=KEY)
    second_name_end = 72 + 2 + (10 + 4 + 3) + (10 + 4 + 3)
    assert data[second_name_end - 3 : second_name_end] == b"w-b"
    with pytest.raises(WireError, match="tensor name 'w-a' appears twice") as err:
        decode_message(patch(data, second_name_end - 1, "<B", ord("a")))
    assert err.value.reason == "bad_name"


@pytest.mark.parametrize("field,value,match", [
    ("key", b"short", "at least 16 bytes"),
    ("nonce", b"\x00" * 15, "nonce must be 16 bytes"),
    ("base_hash", b"\x00" * 31, "base_hash must be 32 bytes"),
    ("round", -1, r"round must be an integer in 0..4294967295, got -1"),
    ("samples", 2**32, "samples must be an integer"),
    ("experiment", "", "experiment name must be a str of 1..255 UTF-8 bytes"),
    ("device", "x" * 256, "device name must be a str of 1..255 UTF-8 bytes"),
    ("kind", "partial", "kind must be one of"),
])
def test_encoder_rejects_bad_fields(field, value, match):
    with pytest.raises(WireError, match=match):
        sample_update(**{field: value})


def test_tensors_must_be_quantized_tensors():
    with pytest.raises(WireError, match="tensors must be QuantizedTensor objects") as err:
        encode_update([np.zeros(3)], experiment="e", device="d", round=0, base_hash=BASE, samples=0, key=KEY)
    assert err.value.reason == "bad_field"


def test_model_hash_identifies_weights():
    w = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    h = model_hash(w)
    assert len(h) == 32
    assert model_hash({"a": w["a"], "b": w["b"]}) == h  # insertion order does not matter
    assert model_hash({"b": w["b"].astype(np.float64), "a": w["a"]}) == h  # values as float32
    assert model_hash({"b": w["b"], "a": w["a"].reshape(4)}) != h
    assert model_hash({"b": w["b"], "c": w["a"]}) != h
    assert model_hash({"b": w["b"] + np.float32(1e-7), "a": w["a"]}) != h


# ---------------------------------------------------------------- verification


def verify(data, **overrides):
    args = dict(experiment="exp-1", round=7, base_hash=BASE, key={"pi-01": KEY, "pi-02": OTHER_KEY}.get,
                seen_nonces=set())
    args.update(overrides)
    return verify_update(data, **args)


def test_verify_accepts_a_good_update():
    seen = {b"\x01" * 16}
    verdict = verify(sample_update(), seen_nonces=seen)
    assert verdict.accepted and verdict.reason == "ok"
    assert verdict.message == decode_message(sample_update())
    assert seen == {b"\x01" * 16}  # only read
    assert verify(sample_update(), key=KEY).accepted  # a plain key works too


def test_verify_rejects_with_distinct_reasons():
    good = sample_update()
    cases = {
        "malformed": verify(good[:-3]),
        "unknown_device": verify(sample_update(device="pi-99")),
        "forged": verify(sample_update(key=OTHER_KEY)),  # pi-02's key, claiming to be pi-01
        "replayed": verify(good, seen_nonces={NONCE}),
        "wrong_experiment": verify(sample_update(experiment="exp-2")),
        "stale_round": verify(sample_update(round=6)),
        "wrong_base": verify(sample_update(base_hash=bytes(32))),
    }
    for reason, verdict in cases.items():
        assert verdict.reason == reason, verdict
        assert not verdict.accepted and verdict.message is None and verdict.detail
    assert cases["malformed"].wire_reason == "bad_length"
    assert cases["forged"].header.device == "pi-01"
    assert "an earlier round" in cases["stale_round"].detail
    future = verify(sample_update(round=8))
    assert future.reason == "stale_round" and "a later round" in future.detail


def test_verify_malformed_tensors_after_a_valid_signature():
    bad = patch(sample_update(), TABLE + 1, "<B", 0)  # resealed with the device key
    verdict = verify(bad)
    assert (verdict.reason, verdict.wire_reason) == ("malformed", "bad_bits")


def test_verify_update_rejects_a_model_message_and_vice_versa():
    model = encode_model(sample_tensors(), experiment="exp-1", round=7, key=KEY)
    assert (verify(model).reason, verify(model).wire_reason) == ("malformed", "bad_type")
    update = verify_model(sample_update(), experiment="exp-1", key=KEY)
    assert (update.reason, update.wire_reason) == ("malformed", "bad_type")


def test_replayed_takes_precedence_over_stale_round():
    # A redelivered copy of a stored update stays recognisable after its round closed.
    verdict = verify(sample_update(round=5), seen_nonces={NONCE})
    assert verdict.reason == "replayed"


def test_verify_model():
    data = encode_model(sample_tensors(), experiment="exp-1", round=8, key=KEY)
    assert verify_model(data, experiment="exp-1", key=PUB, round=8).accepted
    assert verify_model(data, experiment="exp-1", key=PUB).accepted
    assert verify_model(data, experiment="exp-1", key=OTHER_PUB).reason == "forged"
    assert verify_model(data, experiment="exp-1", key=PUB, round=9).reason == "stale_round"
    assert verify_model(data, experiment="other", key=PUB).reason == "wrong_experiment"
    # The private key is not the public one, and an HMAC-style key of the wrong size verifies nothing.
    assert verify_model(data, experiment="exp-1", key=KEY).reason == "forged"
    assert verify_model(data, experiment="exp-1", key=b"k" * 16).reason == "unknown_device"


def test_a_device_cannot_make_a_model_message():
    """A device holds only the public key: signing with it (or with its HMAC key) gives no valid model."""
    for forger in (PUB, OTHER_KEY):
        data = encode_model(sample_tensors(), experiment="exp-1", round=8, key=forger)
        assert verify_model(data, experiment="exp-1", key=PUB).reason == "forged"
