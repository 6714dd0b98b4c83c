"""An integer format handed to the exporters: which grid each tensor of a network sits on, and its int8 mapping.

The grids themselves come from the engine (``edge.infer.fixed_format`` reads
them from a ``Network``); this module only says how a grid maps onto the
``real = scale * (q - zero_point)`` quantization of TFLite and ONNX.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from models.export import ExportError

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class Grid:
    """Integers ``q`` in ``[low, high]`` standing for ``(q - zero) * 2**exponent``."""

    exponent: int
    low: int
    high: int
    zero: int = 0


@dataclass(frozen=True)
class IntegerFormat:
    """Where the fixed-point engine puts each tensor, by layer index of the architecture.

    ``weights[i]`` is the exponent of the weight grid of Dense/Conv2D layer
    ``i`` (its int8 weights are ``w / 2**exponent``); ``inputs[i]`` the grid
    of that layer's input.
    """

    bits: int
    weights: Mapping[int, int]
    inputs: Mapping[int, Grid]
    notes: Mapping[str, str] = field(default_factory=dict)


def int8_params(grid: Grid) -> tuple[float, int]:
    """TFLite ``(scale, zero_point)`` holding ``grid`` in int8 with its top integer at 127.

    Putting ``high`` at 127 makes the int8 clamp saturate exactly where the
    grid does (the engine saturates only at its top); the bottom of the grid
    sits at or above -128.

        >>> int8_params(Grid(-8, 0, 255)), int8_params(Grid(-5, -8, 7))
        ((0.00390625, -128), (0.03125, 120))
    """
    if grid.high - grid.low > INT8_MAX - INT8_MIN:
        raise ExportError(f"a grid of {grid.high - grid.low + 1} levels does not fit int8")
    return 2.0 ** grid.exponent, INT8_MAX - grid.high + grid.zero
