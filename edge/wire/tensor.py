"""One quantized tensor as it travels on the wire, and how it turns back into floats.

A tensor is a name, a shape, bits per value (1..32), a power-of-two scale
exponent and a rounding label. With rounding ``"stochastic"`` or
``"nearest"`` the values are integer codes q in n-bit two's complement and
stand for q * 2**scale_exp; at 1 bit the code q in {-1, 0} stands for the
sign grid (2q + 1) * 2**scale_exp, i.e. -s or +s. With rounding ``"none"``
(only at 32 bits) the values are raw float32, so the 32-bit baseline sends
plain floats.

>>> import numpy as np
>>> t = QuantizedTensor("0.bias", (3,), bits=4, scale_exp=-3, rounding="nearest",
...                     values=np.array([-8, 0, 7]))
>>> dequantize_tensor(t)
array([-1.   ,  0.   ,  0.875], dtype=float32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from edge.wire.bits import code_dtype, packed_size
from edge.wire.errors import WireError

ROUNDINGS = ("stochastic", "nearest", "none")

# Scale exponents a tensor may carry. The lower end reaches below the smallest
# float32 subnormal (2**-149) even for 32-bit codes; the upper end is checked
# per tensor so that the largest code times the scale stays a finite float32.
MIN_SCALE_EXP = -200
MAX_FLOAT32_EXP = 127


def max_scale_exp(bits: int) -> int:
    """The largest scale exponent at which every ``bits``-bit code dequantizes to a finite float32.

    >>> max_scale_exp(8)
    120
    """
    # |q| <= 2**(bits - 1) and float32 holds magnitudes below 2**128.
    return MAX_FLOAT32_EXP - (bits - 1) if bits > 1 else MAX_FLOAT32_EXP


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A named tensor of n-bit codes (or raw float32 at 32 bits) with its scale.

    ``values`` is stored flat-shaped to ``shape`` with dtype
    :func:`~edge.wire.bits.code_dtype` (bits), or float32 for rounding
    ``"none"``; the constructor converts and checks it. Equality compares
    every field and every value (bit for bit).
    """

    name: str
    shape: tuple[int, ...]
    bits: int
    scale_exp: int
    rounding: str
    values: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise WireError("bad_name", f"tensor name must be a non-empty str, got {self.name!r}")
        try:
            shape = tuple(int(d) for d in self.shape)
        except (TypeError, ValueError):
            raise WireError("bad_shape", f"tensor {self.name!r}: shape must be a tuple of ints, got {self.shape!r}") from None
        if any(d < 0 for d in shape):
            raise WireError("bad_shape", f"tensor {self.name!r}: dimensions must be >= 0, got {shape}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= 32:
            raise WireError("bad_bits", f"tensor {self.name!r}: bits must be an integer in 1..32, got {self.bits!r}")
        if self.rounding not in ROUNDINGS:
            raise WireError("bad_rounding", f"tensor {self.name!r}: rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding == "none" and self.bits != 32:
            raise WireError("bad_bits", f"tensor {self.name!r}: rounding 'none' (raw float32) needs bits 32, got {self.bits}")
        if isinstance(self.scale_exp, bool) or not isinstance(self.scale_exp, (int, np.integer)):
            raise WireError("bad_scale", f"tensor {self.name!r}: scale_exp must be an integer, got {self.scale_exp!r}")
        if self.rounding == "none" and self.scale_exp != 0:
            raise WireError("bad_scale", f"tensor {self.name!r}: rounding 'none' (raw float32) has scale_exp 0, "
                                         f"got {self.scale_exp}")
        top = max_scale_exp(self.bits)
        if not MIN_SCALE_EXP <= self.scale_exp <= top:
            raise WireError("bad_scale", f"tensor {self.name!r}: scale_exp must lie in [{MIN_SCALE_EXP}, {top}] "
                                         f"at {self.bits} bits, got {self.scale_exp}")
        values = np.asarray(self.values)
        if values.size != math.prod(shape):
            raise WireError("bad_shape", f"tensor {self.name!r}: shape {shape} holds {math.prod(shape)} values, "
                                         f"got {values.size}")
        values = _float_payload(self.name, values) if self.rounding == "none" else _codes(self.name, values, self.bits)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "scale_exp", int(self.scale_exp))
        object.__setattr__(self, "values", values.reshape(shape))

    @property
    def count(self) -> int:
        """Number of values (the product of the shape)."""
        return int(self.values.size)

    @property
    def payload_size(self) -> int:
        """Bytes of the packed payload: ceil(bits * count / 8)."""
        return packed_size(self.bits, self.count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedTensor):
            return NotImplemented
        return (self.name, self.shape, self.bits, self.scale_exp, self.rounding) == (
            other.name, other.shape, other.bits, other.scale_exp, other.rounding
        ) and self.values.dtype == other.values.dtype and self.values.tobytes() == other.values.tobytes()

    __hash__ = None  # type: ignore[assignment]  # mutable array inside: not hashable

    def __repr__(self) -> str:
        return (f"QuantizedTensor(name={self.name!r}, shape={self.shape}, bits={self.bits}, "
                f"scale_exp={self.scale_exp}, rounding={self.rounding!r})")


def _codes(name: str, values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype.kind not in "iu":
        raise WireError("bad_value", f"tensor {name!r}: codes must be integers, got dtype {values.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.size and (int(values.min()) < lo or int(values.max()) > hi):
        bad = int(values.min()) if int(values.min()) < lo else int(values.max())
        raise WireError("bad_value", f"tensor {name!r}: {bits}-bit codes must lie in [{lo}, {hi}], got {bad}")
    return values.astype(code_dtype(bits), copy=False).reshape(-1)


def _float_payload(name: str, values: np.ndarray) -> np.ndarray:
    if values.dtype != np.float32:
        raise WireError("bad_value", f"tensor {name!r}: rounding 'none' carries float32 values, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise WireError("bad_value", f"tensor {name!r}: float32 values must be finite (no NaN or inf)")
    return values.reshape(-1)


def dequantize_tensor(t: QuantizedTensor) -> np.ndarray:
    """The float32 values a tensor stands for, shaped ``t.shape`` (a new array).

    >>> import numpy as np
    >>> dequantize_tensor(QuantizedTensor("w", (2,), 1, -2, "stochastic", np.array([-1, 0])))
    array([-0.25,  0.25], dtype=float32)
    """
    if t.rounding == "none":
        return t.values.astype(np.float32, copy=True)
    q = t.values.astype(np.float64)
    if t.bits == 1:
        q = 2.0 * q + 1.0  # the sign grid: code -1 -> -s, code 0 -> +s
    return np.ldexp(q, t.scale_exp).astype(np.float32)


def dequantize(tensors: Iterable[QuantizedTensor]) -> dict[str, np.ndarray]:
    """Name -> float32 array for every tensor, in order (e.g. a decoded update's delta).

    >>> import numpy as np
    >>> dequantize([QuantizedTensor("b", (2,), 8, -7, "nearest", np.array([64, -128]))])
    {'b': array([ 0.5, -1. ], dtype=float32)}
    """
    return {t.name: dequantize_tensor(t) for t in tensors}
