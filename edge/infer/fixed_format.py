"""The one place that knows how the fixed-point engine lays out its numbers, for the int8 TFLite export.

Everything the exporter (``models.tflite``) needs about qfl's format is read
here from a ``Network`` and handed over as a ``models.tflite.IntegerFormat``:

- the exponent of each Dense/Conv2D weight grid, from
  :attr:`Network.exponents` (``k - (n-1)`` for the layer's range ``2**k``);
- the grid of each Dense/Conv2D input: the engine's activation quantizer
  (``Numerics.activations``) is run on a calibration batch and its exponent,
  signedness and range recorded. The engine picks that exponent per batch
  from the batch's largest magnitude; a TFLite file needs one fixed scale, so
  the calibration batch stands for all later inputs;
- the logits are the engine's exact accumulator, not rounded: the file
  computes them in float32 (exactly), so they need no grid.

Rounding: the engine rounds activations to nearest, ties to even; TFLite's
requantization rounds ties away from zero (reference kernels) or to even
(XNNPACK), so exact ties can differ by one step (docs/export.md).
"""

from __future__ import annotations

import numpy as np

from edge.fixedpoint import FLOAT_BITS, Fixed, asymmetric_low
from edge.layers import Parametric
from edge.network import Network
from models.integer_format import Grid, IntegerFormat

INT8_BITS = 8


def integer_format(net: Network, calibration: np.ndarray) -> IntegerFormat:
    """The grids of ``net`` (n <= 8) on the batch ``calibration`` (N, *input_shape), for ``export_tflite``."""
    bits = net.bits
    if bits > INT8_BITS:
        raise ValueError(f"an int8 model needs n <= {INT8_BITS} bits; a {bits}-bit network exports as float32")
    weights: dict[int, int] = {}
    inputs: dict[int, Grid] = {}
    exponents = net.exponents
    fx = net.quantize_inputs(calibration)  # the model input's grid, as the engine's forward puts it
    for index, layer in enumerate(net.layers):
        if isinstance(layer, Parametric):
            nm = layer.numerics
            weights[index] = exponents[f"{index}.weight"]
            xq = nm.activations(fx, layer.nonnegative_input)
            inputs[index] = _input_grid(fx, xq, bits)
        fx = layer.forward(fx, False)
    notes = {"activation_rounding": "nearest, ties to even", "calibration_samples": str(len(calibration))}
    return IntegerFormat(bits, weights, inputs, notes)


def _input_grid(x: Fixed, xq: Fixed, bits: int) -> Grid:
    """The grid the engine put the calibration input ``x`` on (``xq``).

    A tensor with both signs that the engine requantized itself sits on the
    asymmetric grid ``[lo, lo + 2**n - 1]`` at the exponent it chose; one
    without negative values on ``[0, 2**n - 1]``; one that arrived already on
    a grid keeps its symmetric range.
    """
    smallest = float(x.q.min())
    if smallest >= 0:
        return Grid(int(xq.exponent), 0, xq.bound - 1)
    if not x.bound:
        lo = asymmetric_low(smallest, xq.exponent - x.exponent)
        return Grid(int(xq.exponent), lo, lo + (1 << bits) - 1)
    return Grid(int(xq.exponent), -xq.bound, xq.bound - 1)


def is_integer_precision(bits: int) -> bool:
    """Whether a ``bits``-bit network exports as int8 (else float32 weights on its grid)."""
    return bits <= INT8_BITS and bits != FLOAT_BITS
