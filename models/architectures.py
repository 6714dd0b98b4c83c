"""Architectures described as data: an input shape and a tuple of layer specs.

Nothing here runs a network; ``edge.network`` builds one from these specs and
``models.counts`` derives the paper's symbols (d, N_c, O_c) from them. Shapes
are channel-first without the batch axis: ``(features,)`` or ``(C, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class Dense:
    """Fully connected layer ``y = x W + b`` with ``units`` outputs."""

    units: int


@dataclass(frozen=True)
class Conv2D:
    """2-D convolution, ``filters`` output channels, square ``kernel``, zero ``padding``."""

    filters: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1


@dataclass(frozen=True)
class ReLU:
    """max(x, 0)."""


@dataclass(frozen=True)
class LeakyReLU:
    """x for x > 0, ``slope * x`` otherwise (slope is a power of two in fixed point)."""

    slope: float = 0.125


@dataclass(frozen=True)
class MaxPool:
    """Non-overlapping ``size`` x ``size`` max pooling."""

    size: int = 2


@dataclass(frozen=True)
class Flatten:
    """Reshape ``(C, H, W)`` to ``(C*H*W,)``."""


LayerSpec = Union[Dense, Conv2D, ReLU, LeakyReLU, MaxPool, Flatten]


@dataclass(frozen=True)
class Architecture:
    """A named network: input shape, layer specs and number of classes."""

    name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSpec, ...]

    @property
    def classes(self) -> int:
        """Number of outputs of the last Dense layer."""
        dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        return dense[-1].units

    def mismatch(self, dataset: str, input_shape: tuple[int, ...], classes: int) -> str | None:
        """Why this network cannot train on ``dataset`` (its sample shape and class count), or None if it can."""
        if math.prod(input_shape) != math.prod(self.input_shape):
            return (f"model {self.name!r} takes inputs of shape {self.input_shape}, but dataset {dataset!r} has "
                    f"{tuple(input_shape)}; pick a model for this dataset (e.g. mlp or cnn for digits, mlp-mnist or "
                    "cnn-mnist for MNIST)")
        if classes > self.classes:
            return f"dataset {dataset!r} has {classes} classes, model {self.name!r} only {self.classes}"
        return None

    def shapes(self) -> list[tuple[int, ...]]:
        """Output shape of every layer, in order (input shape excluded)."""
        shape = self.input_shape
        out = []
        for layer in self.layers:
            shape = output_shape(layer, shape)
            out.append(shape)
        return out


def output_shape(layer: LayerSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape that ``layer`` produces from an input of ``shape`` (no batch axis)."""
    if isinstance(layer, Dense):
        if len(shape) != 1:
            raise ValueError(f"Dense needs a flat input, got shape {shape}; add Flatten() before it")
        return (layer.units,)
    if isinstance(layer, Conv2D):
        if len(shape) != 3:
            raise ValueError(f"Conv2D needs a (C, H, W) input, got shape {shape}")
        _, h, w = shape
        oh = (h + 2 * layer.padding - layer.kernel) // layer.stride + 1
        ow = (w + 2 * layer.padding - layer.kernel) // layer.stride + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2D kernel {layer.kernel} does not fit input {shape}")
        return (layer.filters, oh, ow)
    if isinstance(layer, MaxPool):
        if len(shape) != 3:
            raise ValueError(f"MaxPool needs a (C, H, W) input, got shape {shape}")
        c, h, w = shape
        if h % layer.size or w % layer.size:
            raise ValueError(f"MaxPool size {layer.size} does not divide input {shape}")
        return (c, h // layer.size, w // layer.size)
    if isinstance(layer, Flatten):
        size = 1
        for s in shape:
            size *= s
        return (size,)
    if isinstance(layer, (ReLU, LeakyReLU)):
        return shape
    raise TypeError(f"unknown layer spec {layer!r}")


def mlp(input_shape: tuple[int, ...] = (64,), hidden: tuple[int, ...] = (32,), classes: int = 10,
        name: str = "mlp") -> Architecture:
    """A ReLU multilayer perceptron; inputs of any shape are flattened first."""
    layers: list[LayerSpec] = [] if len(input_shape) == 1 else [Flatten()]
    for units in hidden:
        layers += [Dense(units), ReLU()]
    layers.append(Dense(classes))
    return Architecture(name, tuple(input_shape), tuple(layers))


def cnn(input_shape: tuple[int, ...] = (1, 8, 8), channels: tuple[int, ...] = (8, 16), classes: int = 10,
        name: str = "cnn") -> Architecture:
    """A small CNN: per entry of ``channels`` a 3x3 conv, leaky ReLU and 2x2 max pool, then one Dense."""
    layers: list[LayerSpec] = []
    for filters in channels:
        layers += [Conv2D(filters, kernel=3, padding=1), LeakyReLU(), MaxPool(2)]
    layers += [Flatten(), Dense(classes)]
    return Architecture(name, tuple(input_shape), tuple(layers))


ARCHITECTURES: dict[str, Callable[[], Architecture]] = {
    "mlp": lambda: mlp((64,), (32,), 10, "mlp"),
    "mlp-mnist": lambda: mlp((1, 28, 28), (128,), 10, "mlp-mnist"),
    "cnn": lambda: cnn((1, 8, 8), (8, 16), 10, "cnn"),
    "cnn-mnist": lambda: cnn((1, 28, 28), (8, 16), 10, "cnn-mnist"),
}


def get_architecture(name: str) -> Architecture:
    """Return the architecture registered as ``name`` (see ``ARCHITECTURES``)."""
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None
