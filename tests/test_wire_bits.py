"""pack_bits / unpack_bits against a slow bit-by-bit reference of the spec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.wire import WireError, code_dtype, pack_bits, packed_size, unpack_bits

DERANDOMIZED = settings(derandomize=True, max_examples=300, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


def reference_pack(values, n: int) -> bytes:
    """The spec, one bit at a time: value i at stream bits [i*n, (i+1)*n), LSB first."""
    stream = []
    for v in values:
        u = int(v) & ((1 << n) - 1)
        stream.extend((u >> k) & 1 for k in range(n))
    stream.extend([0] * (-len(stream) % 8))
    return bytes(sum(stream[p + k] << k for k in range(8)) for p in range(0, len(stream), 8))


def reference_unpack(data: bytes, n: int, count: int) -> list[int]:
    out = []
    for i in range(count):
        u = sum(((data[p // 8] >> (p % 8)) & 1) << k for k, p in enumerate(range(i * n, (i + 1) * n)))
        out.append(u - (1 << n) if u >> (n - 1) else u)
    return out


def extremes(n: int) -> list[int]:
    lo, hi = -(1 << (n - 1)), (1 << (n - 1)) - 1
    return [lo, hi, 0, -1, lo + 1, hi - 1] if n > 1 else [-1, 0]


@pytest.mark.parametrize("n", range(1, 33))
def test_matches_reference_for_every_n(n):
    rng = np.random.default_rng(n)
    lo, hi = -(1 << (n - 1)), (1 << (n - 1))
    for count in (0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 203):
        values = rng.integers(lo, hi, count)
        values[: min(count, len(extremes(n)))] = extremes(n)[: min(count, len(extremes(n)))]
        data = pack_bits(values, n)
        assert data == reference_pack(values, n)
        assert len(data) == packed_size(n, count) == -(-n * count // 8)
        out = unpack_bits(data, n, count)
        assert out.dtype == code_dtype(n)
        assert out.tolist() == reference_unpack(data, n, count) == values.tolist()


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 13, 16, 17, 24, 31, 32])
def test_round_trip_across_chunk_boundaries(n):
    # More values than one internal chunk (65536), and a count that is not a multiple of 8.
    rng = np.random.default_rng(100 + n)
    values = rng.integers(-(1 << (n - 1)), 1 << (n - 1), 2 * 65536 + 13).astype(code_dtype(n))
    data = pack_bits(values, n)
    assert len(data) == packed_size(n, values.size)
    np.testing.assert_array_equal(unpack_bits(data, n, values.size), values)
    # The part of the stream a reference can afford to check, around the chunk boundary.
    lo = 65536 - 16
    assert data[lo * n // 8 : (lo + 40) * n // 8] == reference_pack(values[lo : lo + 40], n)
    tail = (values.size // 8 - 2) * 8  # a byte-aligned start: groups of 8 values are n bytes
    assert data[tail * n // 8 :] == reference_pack(values[tail:], n)


def test_hand_written_streams():
    assert pack_bits([1, -1, 2], 3) == bytes([0b10111001, 0b0])
    assert pack_bits([-1, 0, -1, -1, 0, 0, 0, -1, -1], 1) == bytes([0b10001101, 0b1])
    assert pack_bits([0x123, -0x124], 12) == bytes([0x23, 0xC1, 0xED])
    assert pack_bits([-2**31, 2**31 - 1], 32) == bytes([0, 0, 0, 0x80, 0xFF, 0xFF, 0xFF, 0x7F])
    assert pack_bits([], 5) == b""


def test_last_byte_is_zero_padded():
    for n in (1, 3, 5, 7, 11, 19, 27):
        data = pack_bits([-1], n)  # all n bits set
        assert data[-1] == (1 << (n % 8 or 8)) - 1


@DERANDOMIZED
@given(st.integers(1, 32).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(-(1 << (n - 1)), (1 << (n - 1)) - 1), max_size=70))))
def test_round_trip_property(case):
    n, values = case
    data = pack_bits(values, n)
    assert len(data) == -(-n * len(values) // 8)
    assert unpack_bits(data, n, len(values)).tolist() == values
    assert data == reference_pack(values, n)


@DERANDOMIZED
@given(st.integers(1, 32), st.binary(max_size=40))
def test_unpack_then_pack_restores_the_bits(n, data):
    count = len(data) * 8 // n
    values = unpack_bits(data, n, count)
    packed = pack_bits(values, n)
    used = n * count
    # Every bit the values cover comes back; padding comes back as zero.
    assert int.from_bytes(packed, "little") == int.from_bytes(data, "little") & ((1 << used) - 1)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.bool_])
def test_accepts_any_integer_dtype(dtype):
    values = np.array([0, 1, 1, 0, 1], dtype=dtype)
    assert pack_bits(values, 2) == reference_pack([0, 1, 1, 0, 1], 2)
    assert pack_bits(values.reshape(5, 1), 2) == pack_bits(values, 2)  # flattened in C order


def test_accepts_bytearray_memoryview_and_longer_data():
    data = pack_bits([3, -4, 1], 3) + b"\xff\xff"
    for buf in (data, bytearray(data), memoryview(data)):
        assert unpack_bits(buf, 3, 3).tolist() == [3, -4, 1]


def test_out_of_range_value_names_n_range_and_value():
    with pytest.raises(WireError, match=r"4-bit values must lie in \[-8, 7\]; value 8 at index 2") as err:
        pack_bits([0, 7, 8, -8], 4)
    assert err.value.reason == "bad_value"
    assert isinstance(err.value, ValueError)
    with pytest.raises(WireError, match=r"value -9 at index 0"):
        pack_bits(np.array([-9], np.int8), 4)
    with pytest.raises(WireError, match=r"\[-1, 0\]; value 1"):
        pack_bits(np.array([True]), 1)
    with pytest.raises(WireError, match=r"value 2147483648"):
        pack_bits([2**31], 32)


@pytest.mark.parametrize("n", [0, 33, -1, 2.0, True, "8", None])
def test_bad_bit_width(n):
    with pytest.raises(WireError, match="bits per value must be an integer in 1..32") as err:
        pack_bits([0], n)
    assert err.value.reason == "bad_bits"
    with pytest.raises(WireError):
        unpack_bits(b"\x00", n, 1)


def test_non_integer_values_rejected():
    with pytest.raises(WireError, match="expects integer values, got dtype float64"):
        pack_bits([0.5, 1.0], 4)


def test_unpack_short_data_and_bad_count():
    with pytest.raises(WireError, match="3 values of 5 bits need 2 bytes, got 1") as err:
        unpack_bits(b"\x00", 5, 3)
    assert err.value.reason == "truncated"
    with pytest.raises(WireError, match="count must be an integer >= 0"):
        unpack_bits(b"", 5, -1)
    assert unpack_bits(b"", 7, 0).dtype == np.int8


def test_code_dtype():
    assert [code_dtype(n) for n in (1, 8, 9, 16, 17, 32)] == [np.int8, np.int8, np.int16, np.int16, np.int32,
                                                               np.int32]
