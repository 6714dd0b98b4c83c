"""The paper's size symbols for an architecture: d, N_c, O_c and x_dim.

- d (``params``): trainable parameters, weights and biases.
- N_c (``macs``): multiply-accumulates of one forward pass of one sample.
- O_c (``activations``): outputs of the Dense and Conv2D layers of one forward
  pass, the values that are quantized and stored as activations.
- x_dim (``input_size``): values in one input sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from models.architectures import Architecture, Conv2D, Dense


@dataclass(frozen=True)
class Counts:
    """Size figures of one architecture (see the module docstring)."""

    params: int
    macs: int
    activations: int
    input_size: int


def counts(arch: Architecture) -> Counts:
    """Count parameters, MACs and activations of ``arch``, layer by layer."""
    params = macs = activations = 0
    shape = arch.input_shape
    for layer, out in zip(arch.layers, arch.shapes()):
        if isinstance(layer, Dense):
            params += shape[0] * layer.units + layer.units
            macs += shape[0] * layer.units
            activations += layer.units
        elif isinstance(layer, Conv2D):
            fan_in = shape[0] * layer.kernel * layer.kernel
            params += fan_in * layer.filters + layer.filters
            macs += fan_in * prod(out)
            activations += prod(out)
        shape = out
    return Counts(params=params, macs=macs, activations=activations, input_size=prod(arch.input_shape))
