"""Two number formats for n <= 3 bits, where one step is a large share of a tensor's range (issue 15).

At 2 and 3 bits the max-based formats of :mod:`edge.fixedpoint` fail in two
ways, both measured on the CNNs (docs/fixed-point.md):

- **Activations.** The largest value of the batch sets the scale, so a few
  large activations leave the rest on one or two levels. Here the exponent is
  the one of three candidates -- the max-based one and the next two finer
  ones, which saturate the largest values -- with the least squared error,
  rounding and saturation together (:func:`least_error_activations`). The
  exponent stays a power of two and the integers n bits.
- **The loss gradient.** ``p - y`` (probabilities minus the one-hot label)
  spans about [-1, 1] in every row that is confidently wrong. Two's
  complement holds ``-2**(n-1)`` but only ``2**(n-1) - 1`` above zero, so the
  max-based scale saturated the positive side: at 2 bits a probability of
  0.99 on a wrong class pushed back as 0.5. The rows then sum below zero, a
  direction softmax cannot see, and the weights drifted to the ends of their
  grids until the logits and the loss blew up. Here the probabilities are
  rounded stochastically onto the fixed unsigned grid ``k * 2**-t`` (``k`` in
  ``0 .. 2**t``, ``t = max(n, 2) - 1``) and the label is subtracted exactly
  (:func:`quantized_loss_gradient`): unbiased, so the rows sum to zero on
  average, and every product of the backward pass still has n-bit operands. The error
  integers span ``[-2**t, 2**t]``, one value more than t + 1 bits of two's
  complement hold: the ``+2**t`` of a wrong class given probability near 1.

The backward pass of the first: where the least-error grid saturated an
activation (it lies more than half a step above the grid's largest value),
the straight-through estimator passes no gradient, as the derivative of a
clipped quantizer is zero outside its range (:func:`unclipped`). Passing it
pushed those units further up, into a range the grid no longer holds:
measured on the digits MLP at n = 2, over seeds 0-29, 0.875 with it and
0.891 without (docs/fixed-point.md).

From n = 4 up none of this is used: there the max-based formats lose little (a
step is at most 1/8 of the range) and every result measured with them stands.
"""

from __future__ import annotations

import math

import numpy as np

from edge.fixedpoint import (Fixed, RandomSource, asymmetric_low, asymmetric_range, power_of_two, requantize,
                             scale_exponent, uniform)

LOW_BITS = 3
"""The largest precision that uses the formats of this module."""

FINER_CANDIDATES = 2
"""How many finer exponents than the max-based one the activation format tries."""
_STEP_SQUARED = 4.0 ** -np.arange(FINER_CANDIDATES + 1)  # each candidate's step squared, in candidate 0's


def least_error_activations(q: np.ndarray, exponent: int, bits: int, nonnegative: bool = False) -> Fixed:
    """The activation ``q * 2**exponent`` on an n-bit grid whose exponent has the least squared error.

    Candidate 0 is :func:`edge.fixedpoint.requantize`'s max-based grid
    (unsigned, or asymmetric for a tensor with both signs); candidates 1 and 2
    halve and quarter its step and saturate what no longer fits. The error of
    each is the sum of squared differences to the exact values, rounding and
    saturation together; a tie keeps the coarser grid.

        >>> x = np.append(np.full(40, 0.3), 1.9)
        >>> a = requantize(x, 0, bits=2)                 # max-based: step 1/2, the 0.3s become 0.5
        >>> b = least_error_activations(x, 0, bits=2)    # step 1/4: 0.3 -> 0.25, the 1.9 saturates at 0.75
        >>> (a.exponent, sorted(set(a.q.tolist()))), (b.exponent, sorted(set(b.q.tolist())))
        ((-1, [1.0, 3.0]), (-2, [1.0, 3.0]))
    """
    if q.dtype != np.float32 and q.dtype != np.float64:
        q = q.astype(np.float64)
    largest = q.item(q.argmax())
    smallest = 0.0 if nonnegative else q.item(q.argmin())
    if smallest < 0.0:
        if not math.isfinite(largest - smallest):
            scale_exponent(float("nan"), bits)  # raises the diverged-training error
        base = asymmetric_range(largest, smallest, bits)[0]
    else:
        smallest = 0.0
        base = scale_exponent(largest, bits)  # raises if the training diverged
    if base < -100 and q.dtype == np.float32:
        q = q.astype(np.float64)  # values near float32's underflow: scale them where the factor fits
    shifts = [base - finer for finer in range(FINER_CANDIDATES + 1)]
    lows = [asymmetric_low(smallest, shift) if smallest < 0.0 else 0 for shift in shifts]
    codes = (1 << bits) - 1
    # All candidates at once, one row each: the tensors are small, and numpy's cost is per call.
    # The errors in float64, whatever the carrier: the choice must not hinge on float32 sums.
    scaled = q.reshape(1, -1) * np.array([[2.0 ** -shift] for shift in shifts])
    integers = np.rint(scaled)  # at least lo already: rounding keeps the order, and the smallest rounds to lo
    np.minimum(integers, np.array([[low + codes] for low in lows], np.float64), out=integers)
    scaled -= integers
    scaled *= scaled
    errors = np.add.reduce(scaled, axis=1)
    errors *= _STEP_SQUARED  # in units of candidate 0's step
    best = int(errors.argmin())  # the first of equal errors: the coarser grid
    low = lows[best]
    bound = max(-low, low + codes) if smallest < 0.0 else 1 << bits  # as requantize: 2**n if unsigned
    return Fixed(integers[best].reshape(q.shape).astype(q.dtype), exponent + shifts[best], bound)


def unclipped(exact: Fixed, rounded: Fixed) -> np.ndarray | None:
    """Where the grid of ``rounded`` holds ``exact`` to within half a step (a bool mask like ``exact.q``),
    or None where it holds every value: the values outside are the ones it saturated.

        >>> x = Fixed(np.array([0.3, 0.6, 1.9]), 0)
        >>> unclipped(x, least_error_activations(x.q, 0, bits=2)).tolist()   # step 1/4: 1.9 saturates at 0.75
        [True, True, False]
    """
    # Rounding to nearest keeps every value within half a step, and the grids saturate only at the top
    # (the smallest value rounds to the lowest code), so a threshold on the exact values finds the same
    # set as the distance to the grid, in one comparison and only when something saturated.
    top = (rounded.q.item(rounded.q.argmax()) + 0.5) * power_of_two(rounded.exponent - exact.exponent, np.float64)
    if exact.q.item(exact.q.argmax()) <= top:
        return None
    return exact.q <= top


def quantized_loss_gradient(probabilities: np.ndarray, labels: np.ndarray, bits: int,
                            rng: RandomSource) -> Fixed:
    """The error ``p - y`` of softmax cross-entropy (summed over the batch, not averaged) on the n-bit grid.

    ``probabilities`` (B, classes) are rounded stochastically onto
    ``k * 2**-t``, ``t = max(bits, 2) - 1``; the one-hot label is subtracted
    exactly. Unbiased: each row sums to zero on average. The caller divides
    the gradients by B (the loss is the batch mean).

        >>> p = np.array([[0.25, 0.75], [0.99, 0.01]])
        >>> g = quantized_loss_gradient(p, np.array([1, 1]), bits=2, rng=np.random.default_rng(0))
        >>> g.q.tolist(), g.exponent       # the 0.99 on the wrong class is 2 steps of 1/2, not saturated at 1
        ([[1.0, 0.0], [2.0, -2.0]], -1)
    """
    t = max(bits, 2) - 1
    scaled = np.multiply(probabilities, math.ldexp(1.0, t))
    scaled += uniform(rng, scaled.shape)
    np.floor(scaled, out=scaled)  # p <= 1, so at most 2**t
    flat = scaled.reshape(-1)
    picked = np.arange(0, flat.size, scaled.shape[1]) + labels
    flat[picked] -= 1 << t
    return Fixed(scaled, -t, 1 << t)
