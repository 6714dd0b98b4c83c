"""Exact integer matrix products through float BLAS (edge.gemm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.gemm import FLOAT32_EXACT, FLOAT64_EXACT, INT64_LIMIT, accumulate, carrier, int64_reference, int_matmul


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The product in Python integers (object arrays): exact whatever the size."""
    return np.dot(a.astype(object), b.astype(object))


def assert_exact(got: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    assert got.dtype == np.int64
    assert got.tolist() == reference(a, b).tolist()


def operands(bits: int, m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return rng.integers(lo, hi, (m, k), endpoint=True), rng.integers(lo, hi, (k, n), endpoint=True)


def longest_exact_k(bits: int) -> int:
    """Largest inner dimension (up to 64) whose worst case stays inside int64."""
    k = 64
    while k * 4 ** (bits - 1) >= INT64_LIMIT:
        k -= 1
    return k


def test_carrier_thresholds() -> None:
    assert carrier(0) is np.float32
    assert carrier(FLOAT32_EXACT - 1) is np.float32
    assert carrier(FLOAT32_EXACT) is np.float64
    assert carrier(FLOAT64_EXACT - 1) is np.float64
    assert carrier(FLOAT64_EXACT) is np.int64
    assert carrier(INT64_LIMIT - 1) is np.int64
    with pytest.raises(OverflowError, match="more than 63 bits"):
        carrier(INT64_LIMIT)


@pytest.mark.parametrize("bits", range(1, 33))
def test_random_operands_are_exact_at_every_bit_width(bits: int) -> None:
    k = longest_exact_k(bits)
    a, b = operands(bits, 9, k, 5, seed=bits)
    assert_exact(int_matmul(a, b), a, b)


@pytest.mark.parametrize("bits", range(1, 33))
def test_extreme_operands_are_exact_at_every_bit_width(bits: int) -> None:
    k = longest_exact_k(bits)
    most_negative = -(2 ** (bits - 1))
    a = np.full((3, k), most_negative, dtype=np.int64)
    b = np.full((k, 2), most_negative, dtype=np.int64)
    got = int_matmul(a, b)
    assert_exact(got, a, b)
    assert got[0, 0] == k * 4 ** (bits - 1)
    b[:, 1] = 2 ** (bits - 1) - 1  # mixed signs: the most negative product sum
    assert_exact(int_matmul(a, b), a, b)


def straddle(bound_bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Operands whose K * max|a| * max|b| sits just below 2**bound_bits for this k, with an odd result
    too large for the next smaller float type, so a wrong carrier would round it."""
    magnitude = math.isqrt(2**bound_bits // 4) + 1  # k = 4 puts the bound just above 2**bound_bits
    magnitude += 1 - magnitude % 2  # odd
    a = np.full((2, k), magnitude, dtype=np.int64)
    b = np.full((k, 3), magnitude, dtype=np.int64)
    a[0, 0] = magnitude - 1  # even, so row 0 sums to an odd number
    return a, b


@pytest.mark.parametrize("bound_bits, below, above", [(24, np.float32, np.float64), (53, np.float64, np.int64)])
def test_inner_dimension_just_under_and_just_over_each_bound(bound_bits: int, below: type, above: type) -> None:
    for k, expected in ((3, below), (4, above)):
        a, b = straddle(bound_bits, k)
        bound = k * int(a.max()) * int(b.max())
        assert (bound < 2**bound_bits) == (k == 3)
        assert carrier(bound) is expected
        got = int_matmul(a, b)
        assert_exact(got, a, b)
        with int64_reference():
            np.testing.assert_array_equal(int_matmul(a, b), got)
    # The bound is needed: the same K=4 product in the smaller float type is wrong.
    a, b = straddle(bound_bits, 4)
    naive = (a.astype(below) @ b.astype(below)).astype(object)
    assert naive.tolist() != reference(a, b).tolist()


def test_beyond_int64_is_refused() -> None:
    a = np.full((1, 2), -(2**31), dtype=np.int64)
    with pytest.raises(OverflowError, match="more than 63 bits"):
        int_matmul(a, a.T.copy())
    assert_exact(int_matmul(a[:, :1], a[:, :1].T.copy()), a[:, :1], a[:, :1].T)  # K = 1 still fits


def test_small_integer_types_and_unsigned() -> None:
    a = np.array([[-128, 127], [5, -6]], dtype=np.int8)
    b = np.array([[255, 0], [1, 200]], dtype=np.uint8)
    assert_exact(int_matmul(a, b), a, b)
    big = np.array([[2**63 + 5]], dtype=np.uint64)
    with pytest.raises(OverflowError):
        int_matmul(big, np.array([[1]], dtype=np.uint64))
    assert int_matmul(big, np.array([[0]], dtype=np.uint64)).tolist() == [[0]]


def test_empty_operands() -> None:
    assert int_matmul(np.zeros((3, 0), np.int32), np.zeros((0, 2), np.int32)).tolist() == [[0, 0]] * 3


@pytest.mark.parametrize(
    "a, b, error, message",
    [
        (np.ones((2, 2)), np.ones((2, 2), np.int32), TypeError, "a is float64"),
        (np.ones((2, 2), np.int32), [[1, 2], [3, 4]], TypeError, "b is list"),
        (np.ones(3, np.int32), np.ones((3, 1), np.int32), ValueError, "2-D"),
        (np.ones((2, 3), np.int32), np.ones((2, 1), np.int32), ValueError, "inner dimensions 3 != 2"),
    ],
)
def test_bad_input_is_named(a: object, b: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        int_matmul(a, b)  # type: ignore[arg-type]


@settings(max_examples=150, derandomize=True, deadline=None)
@given(bits=st.integers(1, 32), m=st.integers(1, 6), k=st.integers(1, 40), n=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
def test_int_matmul_matches_python_integers(bits: int, m: int, k: int, n: int, seed: int) -> None:
    a, b = operands(bits, m, k, n, seed)
    if k * 4 ** (bits - 1) >= INT64_LIMIT:
        k = longest_exact_k(bits)
        a, b = a[:, :k], b[:k]
    assert_exact(int_matmul(a, b), a, b)


def test_accumulate_carriers_and_exactness() -> None:
    a, b = straddle(24, 3)
    out = accumulate(a.astype(np.float32), b.astype(np.float32), 3 * int(a.max()) * int(b.max()))
    assert out.dtype == np.float32 and out.astype(object).tolist() == reference(a, b).tolist()
    a, b = straddle(24, 4)
    out = accumulate(a.astype(np.float32), b.astype(np.float32), 4 * int(a.max()) * int(b.max()))
    assert out.dtype == np.float64 and out.astype(object).tolist() == reference(a, b).tolist()
    # between 2**53 and 2**63: the exact int64 product, rounded once to float64
    a, b = straddle(53, 4)
    out = accumulate(a.astype(np.float64), b.astype(np.float64), 4 * int(a.max()) * int(b.max()))
    exact = reference(a, b)
    assert out.dtype == np.float64
    assert out.tolist() == [[float(v) for v in row] for row in exact.tolist()]


def test_int64_reference_gives_the_same_products() -> None:
    a, b = operands(8, 16, 64, 8, seed=1)
    fast = accumulate(a.astype(np.float32), b.astype(np.float32), 64 * 128 * 128)
    with int64_reference():
        slow = accumulate(a.astype(np.float32), b.astype(np.float32), 64 * 128 * 128)
    assert slow.dtype == fast.dtype == np.float32
    np.testing.assert_array_equal(slow, fast)
