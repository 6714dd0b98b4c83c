"""Signed n-bit fixed point with a power-of-two scale per tensor (pure numpy).

A fixed-point tensor is a pair ``(q, exponent)``: integer values ``q`` and one
exponent for the whole tensor, the real value being ``q * 2**exponent``. The
integers sit in a float array (float32 or float64, see :func:`carrier_dtype`)
so that BLAS can multiply them exactly (``edge.gemm``).

Two kinds of tensors, following Kim et al. (ICC 2022):

- Weights and biases live on a fixed grid per layer: clipped to the layer's
  range ``[-2**k, 2**k]`` (:func:`weight_range_exponent`, k <= 0 from the
  layer's fan-in), step ``2**(k-(n-1))``, integers in
  ``[-2**(n-1), 2**(n-1) - 1]`` (two's complement, so the largest weight is
  ``2**k - step``). ``n = 1`` is the sign: ``q`` in ``{-1, +1}`` with
  exponent k. Kim et al.'s grid is the case k = 0.
- Activations and backward errors get a dynamic exponent per tensor: the
  smallest that brings the largest magnitude to at most ``2**(n-1)`` (only
  values in the top half step saturate, to ``2**(n-1) - 1``). Tensors without
  negative values (ReLU outputs, image data) are unsigned n-bit, 0 to
  ``2**n - 1``; signed tensors use at least 2 bits (a 1-bit two's complement
  number holds only -1 and 0). Forward activations with both signs (after a
  leaky ReLU) may instead use an asymmetric n-bit range ``[lo, lo + 2**n - 1]``
  (unsigned codes with zero point ``-lo``). See :func:`requantize`.

Rounding is to nearest (ties to even) or stochastic (unbiased): weights take
their updates with stochastic rounding (:func:`update_weights`), backward
errors use it by default, activations round to nearest.

``n = 32`` is plain float32; the functions here are not called for it.

    >>> import numpy as np
    >>> q = quantize_weights(np.array([0.3, -1.7, 0.99]), bits=4)
    >>> q.tolist(), (q * weight_step(4)).tolist()
    ([2.0, -8.0, 7.0], [0.25, -1.0, 0.875])
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Union

import numpy as np

FLOAT_BITS = 32
"""``bits = 32`` means plain float32 training (the standard-FL baseline)."""

_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)  # dtype objects are singletons: ``is`` compares them

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")


def check_bits(bits: object) -> int:
    """Return ``bits`` as an int if it is a whole number in 1..32, else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= FLOAT_BITS:
        raise ValueError(f"bits must be a whole number from 1 to {FLOAT_BITS} (32 = float32), got {bits!r}")
    return int(bits)


def check_rounding(rounding: object) -> Rounding:
    """Return ``rounding`` if it is 'nearest' or 'stochastic', else raise ValueError."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding  # type: ignore[return-value]


FLOAT32_BITS = 9
"""Up to this many bits a network keeps its integers in float32, beyond in float64.

At 9 bits the products of a 64-long dot product (2**9 * 2**8 * 64 = 2**23)
still fit float32's exact integer range, so the matrix products run in float32
BLAS; from 10 bits on most of them need float64, and holding the integers in
float64 from the start saves a conversion per product. Beyond 24 bits float32
could not even hold the integers.
"""


def carrier_dtype(bits: int) -> type[np.floating]:
    """Float type a network at ``bits`` keeps its integers in: float32 up to 9 bits (and at 32), else float64."""
    return np.float32 if bits <= FLOAT32_BITS or bits == FLOAT_BITS else np.float64


# ---------------------------------------------------------------------------
# Weights: a fixed grid per layer, in [-2**k, 2**k]

WEIGHT_RANGE_SIGMAS = 2.0
"""A layer's weight range covers this many standard deviations of its He initialisation."""


def weight_range_exponent(fan_in: int) -> int:
    """``k`` of a layer's weight range ``[-2**k, 2**k]``: the smallest power of two at least
    ``WEIGHT_RANGE_SIGMAS * sqrt(2 / fan_in)`` (two He standard deviations), capped at 1 (k <= 0).

    The range depends on the architecture only (not on n, data or training), so
    every device and the basestation derive the same grids without sending them.

        >>> weight_range_exponent(64), weight_range_exponent(784), weight_range_exponent(9)
        (-1, -3, 0)
    """
    if isinstance(fan_in, bool) or not isinstance(fan_in, (int, np.integer)) or fan_in < 1:
        raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
    # 4 * 2 / fan_in = target**2: compare powers of four exactly instead of taking a float log
    square = WEIGHT_RANGE_SIGMAS**2 * 2.0 / int(fan_in)
    k = 0
    while k > -60 and 4.0 ** (k - 1) >= square:
        k -= 1
    return k


def weight_exponent(bits: int, range_exponent: int = 0) -> int:
    """Exponent of the weight grid of range ``2**range_exponent``: ``range_exponent - (bits - 1)``
    (the sign grid, bits = 1: ``range_exponent``)."""
    return range_exponent if bits == 1 else range_exponent - (bits - 1)


def weight_step(bits: int, range_exponent: int = 0) -> float:
    """Distance between neighbouring weights on the grid: ``2**(k - (bits-1))`` (``2**(k+1)`` for the sign grid)."""
    return 2.0 ** (range_exponent + 1) if bits == 1 else 2.0 ** weight_exponent(bits, range_exponent)


def weight_scale(bits: int, range_exponent: int = 0) -> float:
    """Real value of grid integer 1: ``2**weight_exponent(bits, range_exponent)``."""
    return 2.0 ** weight_exponent(bits, range_exponent)


def weight_limits(bits: int) -> tuple[int, int]:
    """Smallest and largest integer of the weight grid."""
    return (-1, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def quantize_weights(w: np.ndarray, bits: int, rounding: Rounding = "nearest",
                     rng: np.random.Generator | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Integers of the weight grid closest to ``w`` (or stochastically rounded), saturating outside it.

    ``w`` is in units of the grid's range (real value over ``2**k``, see
    :func:`weight_range_exponent`), so the grid is [-1, 1) whatever the layer. Returns the integers in :func:`carrier_dtype` (into ``out`` if given); the
    real values are ``q * 2**weight_exponent(bits)``.

        >>> quantize_weights(np.array([0.2, -0.2, 0.0]), bits=1).tolist()
        [1.0, -1.0, 1.0]
    """
    w = np.asarray(w)
    if w.dtype.kind != "f":
        w = w.astype(np.float64)
    if bits == 1:
        # The sign grid {-1, +1} is the integer grid {0, 1} mapped by 2k - 1.
        k = _round((np.clip(w, -1.0, 1.0) + 1.0) * 0.5, rounding, rng, ties_up=True)
        q = 2.0 * k - 1.0
    else:
        lo, hi = weight_limits(bits)
        q = _round(w * float(1 << (bits - 1)), rounding, rng)  # exact scaling in w's own float type
        np.clip(q, lo, hi, out=q)
    if out is None:
        return q.astype(carrier_dtype(bits))
    out[...] = q
    return out


def update_weights(q: np.ndarray, delta: np.ndarray, bits: int, rng: RandomSource, scale: float = 1.0) -> None:
    """Add ``scale * delta`` to the grid integers ``q`` in place, with stochastic rounding.

    ``scale * delta`` is in units of the grid's range (as the input of
    :func:`quantize_weights`); ``scale`` is a number or an array like ``q``
    (a network passes ``lr * 2**-k`` per element, k of the weight's layer).

    Each weight lands on one of the two grid points around ``w + scale * delta``,
    the upper one with probability equal to the fractional distance, so the
    update is unbiased and an update far smaller than one step still moves the
    weight now and then instead of being lost. The result saturates at the
    grid limits.
    """
    if bits == 1:
        q[...] = quantize_weights(q + delta * scale, 1, "stochastic", _generator(rng))
        return
    factor = scale * float(1 << (bits - 1))
    lo, hi = weight_limits(bits)
    add_stochastic(q, delta, factor, _constant(lo, q.dtype), _constant(hi, q.dtype), rng)


def add_stochastic(q: np.ndarray, delta: np.ndarray, factor: float | np.ndarray, low: np.ndarray,
                   high: np.ndarray, rng: RandomSource) -> None:
    """The step of :func:`update_weights` (n >= 2) with its constants given: ``q += floor(delta * factor + u)``,
    saturated at ``low`` and ``high``, in place.

    ``factor`` converts ``delta`` into grid steps. A network that updates the
    same buffer every step passes ``factor``, ``low`` and ``high`` as arrays
    shaped like ``q`` (``grid_limits``): numpy's maximum and minimum run about
    twice as fast against a full array as against a 0-d one.
    """
    steps = delta * factor if delta.dtype is q.dtype else np.multiply(delta, factor, dtype=q.dtype)
    steps += uniform(rng, steps.shape)
    np.floor(steps, out=steps)
    q += steps
    # No test first: in training nearly every step has weights at an end of the grid.
    np.maximum(q, low, out=q)
    np.minimum(q, high, out=q)


def grid_limits(bits: int, size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The weight grid's smallest and largest integer (n >= 2), each as a flat array of ``size`` in ``dtype``."""
    lo, hi = weight_limits(bits)
    return np.full(size, lo, dtype), np.full(size, hi, dtype)


# ---------------------------------------------------------------------------
# Randomness for stochastic rounding


class UniformPool:
    """Uniform numbers in (0, 1) for stochastic rounding, drawn from ``rng`` in blocks.

    Each number is ``(k + 1/2) / 2**16`` with ``k`` a uniform random 16-bit
    integer: stochastic rounding with it rounds up with a probability within
    ``2**-17`` of the fractional part, at a third of the cost of
    ``rng.random`` (a training step needs a uniform number per weight and per
    backward error).

        >>> pool = UniformPool(np.random.default_rng(0))
        >>> u = pool.draw((2, 3))
        >>> u.shape, bool(((u > 0) & (u < 1)).all())
        ((2, 3), True)
    """

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16) -> None:
        self.rng = rng
        self.block = block
        self._pool = np.empty(0, dtype=np.float32)
        self._position = 0

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` with fresh uniform numbers (never handed out before)."""
        start = self._position
        end = start + math.prod(shape)
        if end > len(self._pool):
            size = max(self.block, end - start)
            raw = self.rng.bit_generator.random_raw((size + 3) // 4).view(np.uint16)[:size]
            pool = raw.astype(np.float32)
            pool += np.float32(0.5)
            pool *= np.float32(2.0 ** -16)  # (k + 1/2) / 2**16, exactly
            self._pool, start, end = pool, 0, end - start  # a new array: earlier draws stay valid
        self._position = end
        return self._pool[start:end].reshape(shape)


RandomSource = Union[np.random.Generator, UniformPool]


def uniform(rng: RandomSource, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 uniform numbers in [0, 1) from a numpy Generator or a :class:`UniformPool`."""
    if isinstance(rng, UniformPool):
        return rng.draw(shape)
    return rng.random(shape, dtype=np.float32)


def _generator(rng: RandomSource) -> np.random.Generator:
    return rng.rng if isinstance(rng, UniformPool) else rng


# ---------------------------------------------------------------------------
# Activations and errors: dynamic power-of-two scale


class Fixed(NamedTuple):
    """A tensor ``q * 2**exponent`` held in a float array.

    ``bound > 0`` marks integers already on an n-bit grid with ``|q| <= bound``
    (what :func:`requantize` returns; layers that keep the integers pass it
    on); 0 means "not known to be on a grid", e.g. a wide accumulator.
    """

    q: np.ndarray
    exponent: int
    bound: int = 0


def dynamic_format(bits: int, unsigned: bool) -> tuple[int, int]:
    """``(t, limit)`` of a dynamically scaled tensor: it is scaled so that its largest
    magnitude is at most ``2**t``, and its integers saturate at ``limit``.

    Two's complement with ``b = max(bits, 2)`` bits: ``(b - 1, 2**(b-1) - 1)``
    (a 1-bit two's complement number holds only -1 and 0, nothing for a signed
    error); unsigned ``bits`` bits for tensors without negative values, such as
    ReLU outputs and image data: ``(bits, 2**bits - 1)``.
    """
    t = bits if unsigned else max(bits, 2) - 1
    return t, (1 << t) - 1


def scale_exponent(max_abs: float, t: int) -> int:
    """Smallest exponent ``e`` with ``max_abs * 2**-e <= 2**t``; 0 for an all-zero tensor.

    A non-finite ``max_abs`` (the training diverged) raises FloatingPointError.

        >>> scale_exponent(1.0, 7), scale_exponent(200.0, 7), scale_exponent(0.01, 3)
        (-7, 1, -9)
    """
    if max_abs <= 0.0:
        return 0
    if not math.isfinite(max_abs):
        raise FloatingPointError(f"cannot choose a fixed-point scale for a tensor holding {max_abs}; "
                                 "the training diverged (try a smaller learning rate)")
    mantissa, exp = math.frexp(max_abs)  # max_abs = mantissa * 2**exp, mantissa in [0.5, 1)
    return (exp - 1 if mantissa == 0.5 else exp) - t  # ceil(log2(max_abs)) - t, exactly


def requantize(q: np.ndarray, exponent: int, bits: int, rounding: Rounding = "nearest",
               rng: RandomSource | None = None, *, nonnegative: bool = False, asymmetric: bool = False) -> Fixed:
    """Put the tensor ``q * 2**exponent`` onto a ``bits``-bit grid with a dynamic power-of-two scale.

    ``q`` is any float array (a wide accumulator, or real values with exponent
    0). The exponent is the smallest that brings the largest magnitude to at
    most ``2**t`` of :func:`dynamic_format`, so at most the values in the top
    half step saturate (by less than one step) and no range is wasted when the
    largest value is a power of two. A tensor without negative values is
    stored unsigned. ``nonnegative=True`` promises that and saves a pass.
    Returns new integers (at least :func:`carrier_dtype` wide), their exponent
    and ``2**t``, a bound on their magnitude.

    ``asymmetric=True`` (round to nearest only) stores a tensor with both
    signs as n-bit unsigned codes with a zero point, see :func:`asymmetric_range`.

        >>> x = requantize(np.array([0.5, -3.0, 12.0], dtype=np.float32), 0, bits=4)
        >>> x.q.tolist(), x.exponent, x.bound
        ([0.0, -2.0, 6.0], 1, 8)
        >>> requantize(np.array([0.0, 0.3, 1.0]), 0, bits=4).q.tolist()   # unsigned: 0..15
        [0.0, 5.0, 15.0]
    """
    if q.dtype is not _FLOAT64 and (q.dtype is not _FLOAT32 or bits > FLOAT32_BITS):
        q = q.astype(np.float64)
    # The range through argmax/argmin: plain methods, cheaper than the ufunc reductions
    # behind max()/min() on the small tensors of a training step. Both pick a NaN if any.
    largest = q.item(q.argmax())
    smallest = 0.0 if nonnegative else q.item(q.argmin())
    if asymmetric and smallest < 0.0:
        return _requantize_asymmetric(q, exponent, bits, largest, smallest)
    # dynamic_format() inlined: this runs several times per training step
    t = bits if smallest >= 0.0 else (bits if bits > 1 else 2) - 1
    limit = (1 << t) - 1
    shift = scale_exponent(-smallest if -smallest > largest else largest, t)  # a NaN largest reaches the check
    if shift < -100 and q.dtype is _FLOAT32:
        q = q.astype(np.float64)  # values near float32's underflow: scale them where the factor fits
    if rounding == "nearest":
        if shift:
            scaled = np.multiply(q, power_of_two(-shift, q.dtype))
            np.rint(scaled, out=scaled)
        else:
            scaled = np.rint(q)
        overflow = math.ldexp(largest, -shift) >= limit + 0.5
    else:
        if rng is None:
            raise ValueError("stochastic rounding needs a random source (numpy Generator or UniformPool)")
        if shift:
            scaled = np.multiply(q, power_of_two(-shift, q.dtype))
            scaled += uniform(rng, q.shape)
        else:
            scaled = q + uniform(rng, q.shape)
        np.floor(scaled, out=scaled)
        overflow = math.ldexp(largest, -shift) > limit
    if overflow:
        np.minimum(scaled, limit, out=scaled)
    return Fixed(scaled, exponent + shift, 1 << t)


def asymmetric_range(largest: float, smallest: float, bits: int) -> tuple[int, int, int]:
    """``(shift, lo, hi)`` of the asymmetric n-bit grid for a tensor spanning ``[smallest, largest]`` (smallest < 0).

    The integers are ``q = round(x * 2**-shift)`` clipped to ``[lo, hi]``, with
    ``hi - lo = 2**n - 1``: stored as unsigned n-bit codes ``q - lo`` with zero
    point ``-lo`` (the real value is ``(code - zero_point) * 2**exponent``).
    ``shift`` is the smallest exponent that brings the span to at most
    ``2**n - 1`` steps and ``lo = round(smallest * 2**-shift)``, so only a
    rounding tie at the top saturates. A leaky ReLU output (slope 1/8) keeps
    about 7/8 of the codes for its positive part instead of half.

        >>> asymmetric_range(7.0, -1.0, bits=4)   # step 1: codes 0..15 hold -1..14
        (0, -1, 14)
        >>> asymmetric_range(1.0, -0.125, bits=2)   # step 1/2: -0.125 rounds to 0, codes hold 0..3
        (-1, 0, 3)
    """
    span = largest - smallest
    shift = scale_exponent(span, bits)
    top = (1 << bits) - 1
    if math.ldexp(span, -shift) > top:
        shift += 1
    lo = asymmetric_low(smallest, shift)
    return shift, lo, lo + top


def asymmetric_low(smallest: float, shift: int) -> int:
    """``lo`` of an asymmetric grid with exponent ``shift``: the tensor's smallest value, rounded onto it."""
    return round(math.ldexp(smallest, -shift))


def _requantize_asymmetric(q: np.ndarray, exponent: int, bits: int, largest: float, smallest: float) -> Fixed:
    if not math.isfinite(largest - smallest):
        scale_exponent(float("nan"), bits)  # raises the diverged-training error
    shift, lo, hi = asymmetric_range(largest, smallest, bits)
    scaled = np.multiply(q, power_of_two(-shift, q.dtype)) if shift else q.copy()
    np.rint(scaled, out=scaled)
    np.clip(scaled, lo, hi, out=scaled)
    return Fixed(scaled, exponent + shift, max(-lo, hi))


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: unbiased, ``E[result] = x``, variance ``p(1-p) <= 1/4``.

        >>> stochastic_round(np.full(8, 2.25), np.random.default_rng(1)).tolist()
        [2.0, 3.0, 2.0, 3.0, 2.0, 2.0, 3.0, 2.0]
    """
    x = np.asarray(x, dtype=np.float64)
    return np.floor(x + rng.random(x.shape))


def _round(x: np.ndarray, rounding: Rounding, rng: np.random.Generator | None, ties_up: bool = False) -> np.ndarray:
    if rounding == "stochastic":
        if rng is None:
            raise ValueError("stochastic rounding needs a numpy Generator (rng)")
        return np.floor(x + rng.random(np.shape(x)))
    if rounding != "nearest":
        check_rounding(rounding)
    return np.floor(x + 0.5) if ties_up else np.rint(x)


_CONSTANTS: dict[tuple[float, np.dtype], np.ndarray] = {}


def _constant(value: float, dtype: np.dtype) -> np.ndarray:
    """``value`` as a 0-d array of ``dtype``, cached.

    numpy combines an array with a 0-d array of its own type faster than with a
    Python number, which it converts on every call: about 0.1 us of the 0.5 us
    an operation on the small tensors of a training step costs.
    """
    key = (value, dtype)
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = np.array(value, dtype)
    return constant


_POWERS_OF_TWO: dict[tuple[int, np.dtype], np.ndarray | float] = {}


def power_of_two(exponent: int, dtype: np.dtype) -> np.ndarray | float:
    """``2**exponent`` to scale arrays of ``dtype`` by, exactly and cheaply (see :func:`_constant`).

    A cached 0-d array of ``dtype`` within that type's normal range, else a Python float.

        >>> power_of_two(-3, np.dtype(np.float32)), power_of_two(200, np.dtype(np.float32))
        (array(0.125, dtype=float32), 1.6069380442589903e+60)
    """
    key = (exponent, dtype)
    value = _POWERS_OF_TWO.get(key)
    if value is None:
        info = np.finfo(dtype)
        value = np.array(2.0 ** exponent, dtype) if info.minexp <= exponent < info.maxexp else 2.0 ** exponent
        _POWERS_OF_TWO[key] = value
    return value


def dequantize(q: np.ndarray, exponent: int) -> np.ndarray:
    """Real values ``q * 2**exponent`` as float32 (a new array)."""
    return np.multiply(q, 2.0 ** exponent, dtype=np.float32)
