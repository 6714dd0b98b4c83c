"""Exact integer matrix products through floating-point BLAS.

numpy's integer matmul does not use BLAS: on these machines it is tens of
times slower than float32 (see ``bench/train_step.py``). A float holds every
integer up to 2**24 (float32) or 2**53 (float64) exactly, and a matrix
product only multiplies and adds; if every product and every partial sum is
an integer below that limit, no step rounds, whatever order BLAS sums in. For
``a`` (M x K) and ``b`` (K x N) every partial sum is at most
``K * max|a| * max|b|`` in magnitude, so that bound picks the carrier:

============================  ===========================================
bound                         carrier
============================  ===========================================
``< 2**24``                   float32 BLAS
``< 2**53``                   float64 BLAS
``< 2**63``                   numpy int64 (exact, slow)
beyond                        no exact int64 result exists (OverflowError)
============================  ===========================================

    >>> import numpy as np
    >>> a = np.array([[-128, 127]], dtype=np.int8); b = np.array([[-128], [-128]], dtype=np.int8)
    >>> int_matmul(a, b).tolist()
    [[128]]
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
INT64_LIMIT = 1 << 63

_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)  # dtype objects are singletons: ``is`` compares them
_force_int64 = False


def product_bound(k: int, max_a: int, max_b: int) -> int:
    """Bound on every partial sum of a K-term dot product: ``k * max_a * max_b`` (exact Python int)."""
    return int(k) * int(max_a) * int(max_b)


def carrier(bound: int) -> type[np.number]:
    """The cheapest dtype whose matmul is exact when all partial sums stay below ``bound``.

        >>> carrier(2**24 - 1).__name__, carrier(2**24).__name__, carrier(2**53).__name__
        ('float32', 'float64', 'int64')
    """
    if bound < FLOAT32_EXACT:
        return np.float32
    if bound < FLOAT64_EXACT:
        return np.float64
    if bound < INT64_LIMIT:
        return np.int64
    raise OverflowError(f"an exact product needs more than 63 bits here (K * max|a| * max|b| = {bound} >= 2**63); "
                        "use smaller operands or a shorter inner dimension")


def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact ``a @ b`` of two 2-D integer arrays, as int64, through float BLAS whenever that is exact.

    Raises TypeError for non-integer arrays, ValueError for shapes that do not
    multiply and OverflowError when the result might not fit int64.

        >>> int_matmul(np.full((2, 3), -4), np.full((3, 1), 5)).tolist()
        [[-60], [-60]]
    """
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, np.ndarray) or m.dtype.kind not in "iu":
            kind = m.dtype if isinstance(m, np.ndarray) else type(m).__name__
            raise TypeError(f"int_matmul needs integer numpy arrays; {name} is {kind}")
        if m.ndim != 2:
            raise ValueError(f"int_matmul needs 2-D arrays; {name} has shape {m.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not multiply: "
                         f"inner dimensions {a.shape[1]} != {b.shape[0]}")
    if a.size == 0 or b.size == 0:
        return np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
    bound = product_bound(a.shape[1], _max_abs(a), _max_abs(b))
    dtype = carrier(bound)  # raises before anything could wrap around
    if _force_int64:
        dtype = np.int64
    return np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False)).astype(np.int64, copy=False)


def accumulate(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """``a @ b`` for float arrays holding integers, given a bound on every partial sum.

    The hot path of the layers: no checks, no conversion when the operands are
    already in the right float type. Returns float32 below 2**24 and float64
    beyond. Exact below 2**63; between 2**53 and 2**63 the product is exact in
    int64 and then rounded once to float64; beyond 2**63 (only for n >= 29
    with long dot products) it is a float64 BLAS product.
    """
    if bound < FLOAT64_EXACT and not _force_int64:
        dtype = _FLOAT32 if bound < FLOAT32_EXACT else _FLOAT64
        return np.matmul(a if a.dtype is dtype else a.astype(dtype), b if b.dtype is dtype else b.astype(dtype))
    if bound < INT64_LIMIT:
        exact = np.matmul(a.astype(np.int64), b.astype(np.int64))
        return exact.astype(np.float32 if bound < FLOAT32_EXACT else np.float64)
    return np.matmul(a.astype(np.float64, copy=False), b.astype(np.float64, copy=False))


@contextmanager
def int64_reference() -> Iterator[None]:
    """Within the block every product goes through numpy int64 matmul instead of BLAS.

    For benchmarks and tests that compare against the plain integer path; the
    results are the same, only slower.

        >>> with int64_reference():
        ...     int_matmul(np.ones((1, 2), np.int8), np.ones((2, 1), np.int8)).tolist()
        [[2]]
    """
    global _force_int64
    previous, _force_int64 = _force_int64, True
    try:
        yield
    finally:
        _force_int64 = previous


def _max_abs(m: np.ndarray) -> int:
    return max(int(m.max()), -int(m.min()))
