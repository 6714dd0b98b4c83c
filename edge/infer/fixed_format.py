"""The one place that knows how the fixed-point engine lays out its numbers, for the int8 TFLite export.

Everything the exporter (``models.tflite``) needs about qfl's format is read
here from a ``Network`` and handed over as a ``models.tflite.IntegerFormat``:

- the exponent of each Dense/Conv2D weight grid (today the fixed
  ``2**-(n-1)`` of ``Numerics.weight_exponent``; a layer's own
  ``weight_exponent`` attribute wins if it has one);
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

from edge.fixedpoint import FLOAT_BITS, Fixed
from edge.layers import Parametric
from edge.network import Network, _channels_last
from models.integer_format import Grid, IntegerFormat

INT8_BITS = 8


def integer_format(net: Network, calibration: np.ndarray) -> IntegerFormat:
    """The grids of ``net`` (n <= 8) on the batch ``calibration`` (N, *input_shape), for ``export_tflite``."""
    bits = net.bits
    if bits > INT8_BITS:
        raise ValueError(f"an int8 model needs n <= {INT8_BITS} bits; a {bits}-bit network exports as float32")
    weights: dict[int, int] = {}
    inputs: dict[int, Grid] = {}
    fx = Fixed(_channels_last(net.as_batch(calibration)), 0)
    for index, layer in enumerate(net.layers):
        if isinstance(layer, Parametric):
            nm = layer.numerics
            weights[index] = int(getattr(layer, "weight_exponent", nm.weight_exponent))
            signed = bool(fx.q.min() < 0)
            xq = nm.activations(fx, layer.nonnegative_input)
            high = xq.bound - 1
            inputs[index] = Grid(int(xq.exponent), -xq.bound if signed else 0, high)
        fx = layer.forward(fx, False)
    notes = {"activation_rounding": "nearest, ties to even", "calibration_samples": str(len(calibration))}
    return IntegerFormat(bits, weights, inputs, notes)


def is_integer_precision(bits: int) -> bool:
    """Whether a ``bits``-bit network exports as int8 (else float32 weights on its grid)."""
    return bits <= INT8_BITS and bits != FLOAT_BITS
