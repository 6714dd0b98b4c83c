"""Uplink quantization: a model difference onto an m-bit grid, and back.

Two schemes, one implementation (they differ only in how the scale is picked):

- ``"scaled"`` (default): per tensor, the smallest power-of-two scale
  2**e with max|x| <= (2**(m-1) - 1) * 2**e, so the largest magnitude fits
  and small updates keep their resolution.
- ``"kim2022"``: the fixed grid of Kim et al. (ICC 2022), step 2**-(m-1),
  no scale; values are clipped to [-1, 1 - 2**-(m-1)], the range m-bit two's
  complement holds on that grid.

Rounding is stochastic (unbiased: E[q * 2**e] = x inside the range) with a
seeded ``numpy.random.Generator``, or to nearest. m = 1 is the sign grid
{-2**e, +2**e}; m = 32 sends raw float32 (rounding ``"none"``), whatever the
scheme, so the 32-bit baseline is the same code path.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> [t] = quantize_update({"0.bias": np.array([0.5, -0.25, 0.0], np.float32)}, 4, rng)
>>> (t.bits, t.scale_exp, t.values.tolist())
(4, -3, [4, -2, 0])
>>> dequantize([t])["0.bias"]
array([ 0.5 , -0.25,  0.  ], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from numpy.typing import ArrayLike

from edge.wire.tensor import MIN_SCALE_EXP, QuantizedTensor, dequantize, dequantize_tensor, max_scale_exp

__all__ = ["SCHEMES", "quantize_tensor", "quantize_update", "dequantize", "dequantize_tensor"]

SCHEMES = ("scaled", "kim2022")


def quantize_update(delta: Mapping[str, ArrayLike], m: int, rng: np.random.Generator | None, *,
                    scheme: str = "scaled", rounding: str = "stochastic") -> list[QuantizedTensor]:
    """Quantize every tensor of ``delta`` (name -> float array) to ``m`` bits, in order.

    One generator draws for all tensors in order, so a seed fixes the result.

    >>> import numpy as np
    >>> ts = quantize_update({"w": np.ones((2, 2), np.float32)}, 8, np.random.default_rng(1))
    >>> ts[0].shape, ts[0].values.dtype
    ((2, 2), dtype('int8'))
    """
    return [quantize_tensor(name, x, m, rng, scheme=scheme, rounding=rounding) for name, x in delta.items()]


def quantize_tensor(name: str, x: ArrayLike, m: int, rng: np.random.Generator | None, *,
                    scheme: str = "scaled", rounding: str = "stochastic") -> QuantizedTensor:
    """Quantize one float tensor to ``m`` bits (1..32) with the given scheme and rounding.

    Raises ValueError for an unknown scheme or rounding, a missing generator
    with stochastic rounding, or non-finite values (a diverged update).

    >>> import numpy as np
    >>> t = quantize_tensor("w", [0.3, -0.9], 2, None, scheme="kim2022", rounding="nearest")
    >>> t.values.tolist(), t.scale_exp
    ([1, -2], -1)
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= 32:
        raise ValueError(f"uplink bits m must be an integer in 1..32, got {m!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown uplink scheme {scheme!r}; expected one of {SCHEMES}")
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"unknown rounding {rounding!r}; expected 'stochastic' or 'nearest'")
    if m < 32 and rounding == "stochastic" and not isinstance(rng, np.random.Generator):
        raise ValueError(f"stochastic rounding needs a seeded numpy.random.Generator, got {type(rng).__name__}")
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"tensor {name!r}: expected a float array, got dtype {arr.dtype}")
    x64 = arr.astype(np.float64)
    if not np.isfinite(x64).all():
        bad = int(np.count_nonzero(~np.isfinite(x64)))
        raise ValueError(f"tensor {name!r} has {bad} non-finite values (NaN or inf); cannot quantize it")
    shape = tuple(arr.shape)
    if m == 32:
        return QuantizedTensor(name, shape, 32, 0, "none", arr.astype(np.float32))
    if scheme == "kim2022":
        exp = 0 if m == 1 else -(m - 1)
        top = 1.0 if m == 1 else 1.0 - 2.0 ** -(m - 1)
        x64 = np.clip(x64, -1.0, top)
    else:
        exp = _scale_exponent(float(np.max(np.abs(x64))) if x64.size else 0.0, m)
    y = np.ldexp(x64, -exp)  # exact: a power-of-two scaling
    codes = _sign_codes(y, rounding, rng) if m == 1 else _grid_codes(y, m, rounding, rng)
    return QuantizedTensor(name, shape, m, exp, rounding, codes)


def _scale_exponent(peak: float, m: int) -> int:
    """Smallest e with peak <= qmax * 2**e (qmax = 2**(m-1) - 1, or 1 for the sign grid)."""
    qmax = 1 if m == 1 else (1 << (m - 1)) - 1
    if peak == 0.0:
        return MIN_SCALE_EXP if m == 1 else 0  # all codes 0 (at 1 bit: +-2**-200, float32 zero)
    exp = math.ceil(math.log2(peak / qmax))
    # log2 is not exact near powers of two: settle e on the exact comparison.
    while math.ldexp(qmax, exp - 1) >= peak:
        exp -= 1
    while math.ldexp(qmax, exp) < peak:
        exp += 1
    return min(max(exp, MIN_SCALE_EXP), max_scale_exp(m))


def _grid_codes(y: np.ndarray, m: int, rounding: str, rng: np.random.Generator | None) -> np.ndarray:
    lo, hi = -(1 << (m - 1)), (1 << (m - 1)) - 1
    if rounding == "nearest":
        q = np.rint(y)
    else:
        q = np.floor(y + rng.random(y.shape))  # P(round up) = frac(y): unbiased
    # The clip only catches float rounding at the very top of the range.
    return np.clip(q, lo, hi).astype(np.int64)


def _sign_codes(y: np.ndarray, rounding: str, rng: np.random.Generator | None) -> np.ndarray:
    y = np.clip(y, -1.0, 1.0)
    if rounding == "nearest":
        up = y >= 0
    else:
        up = rng.random(y.shape) < (y + 1.0) / 2.0  # P(+s) = (y + 1) / 2: E = s * y
    return np.where(up, 0, -1).astype(np.int64)
