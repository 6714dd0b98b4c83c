"""A fixed-point network built from a ``models.Architecture``, its parameters in one flat buffer.

    >>> from models import get_architecture
    >>> net = Network(get_architecture("mlp"), bits=8, seed=0)
    >>> net.predict(np.zeros((2, 64), np.float32)).shape
    (2, 10)
    >>> net.exponents["0.weight"]     # range 2**-1 for fan-in 64, step 2**(-1 - 7)
    -8
    >>> float(net.get_weights()["0.weight"][0, 0] * 2**8).is_integer()   # on the layer's 8-bit grid
    True

Training modes, for ``bits < 32`` (at 32 bits both are plain float32):

Every Dense or Conv2D layer has its own power-of-two weight range
``[-2**k, 2**k]`` from its fan-in (``edge.fixedpoint.weight_range_exponent``),
so its grid step is ``2**(k - (n-1))``; :attr:`Network.exponents` gives the
resulting exponent per parameter (real value = integer * 2**exponent).

- ``"int"`` (default): the network's only state is the n-bit integers of the
  weight grids, no float copy; updates are added with stochastic rounding
  (``edge.fixedpoint.update_weights``) so updates smaller than a step still
  move weights in expectation.
- ``"master"``: a float master copy takes the updates and is clipped to
  the layer's range; forward and backward passes use its nearest grid point,
  and the gradient with respect to the grid point is applied to the master
  (straight-through estimator, as in fake-quantization training).

``get_weights`` returns the trainable state: the grid values (int mode) or the
master copy (master mode; ``quantized=True`` gives its grid values).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge.fixedpoint import (
    FLOAT_BITS,
    Fixed,
    Rounding,
    UniformPool,
    carrier_dtype,
    check_bits,
    add_stochastic,
    check_rounding,
    grid_limits,
    power_of_two,
    quantize_weights,
    requantize,
    update_weights,
    weight_exponent,
    weight_range_exponent,
    weight_scale,
)
from edge.layers import (
    Conv2D,
    Dense,
    Flatten,
    LeakyReLU,
    MaxPool,
    Numerics,
    Parametric,
    ReLU,
    softmax_cross_entropy,
    softmax_probabilities,
)
from edge.lowbit import LOW_BITS, quantized_loss_gradient
from models import architectures as specs

MODES = ("int", "master")


class Network:
    """A QNN for ``arch`` at ``bits`` (1..32) in ``mode`` "int" or "master", initialised from ``seed``.

    ``error_rounding`` is how backward errors are put onto the n-bit grid
    ("stochastic", the default, or "nearest"); forward activations always
    round to nearest. ``float_dtype`` is the float type of the 32-bit path:
    float32, the baseline, or float64 (for gradient checks).
    """

    def __init__(self, arch: specs.Architecture, bits: int = 8, mode: str = "int", seed: int = 0, *,
                 error_rounding: Rounding = "stochastic", float_dtype: type = np.float32) -> None:
        if not isinstance(arch, specs.Architecture):
            raise TypeError(f"arch must be a models.Architecture (e.g. models.get_architecture('mlp')), got {arch!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'int' or 'master', got {mode!r}")
        if float_dtype not in (np.float32, np.float64):
            raise ValueError(f"float_dtype must be numpy.float32 or numpy.float64, got {float_dtype!r}")
        self.arch, self.mode, self._float_dtype = arch, mode, float_dtype
        self.rng = np.random.default_rng(seed)
        self._uniform = UniformPool(self.rng)  # for stochastic rounding in the hot path
        self._bits = check_bits(bits)
        self.numerics = Numerics(self._bits, check_rounding(error_rounding), self._uniform)
        self.layers = _build_layers(arch, self.numerics)
        self._params = [layer for layer in self.layers if isinstance(layer, Parametric)]
        if not self._params:
            raise ValueError(f"architecture {arch.name!r} has no Dense or Conv2D layer to train")
        self._first_param = self.layers.index(self._params[0])
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        for index, layer in enumerate(self.layers):
            for suffix, shape in layer.param_shapes:
                self.param_shapes[f"{index}.{suffix}"] = shape
        self.size = sum(int(np.prod(shape)) for shape in self.param_shapes.values())
        self.range_exponents = [weight_range_exponent(layer.fan_in) for layer in self._params]
        ranges = []
        for layer, k in zip(self._params, self.range_exponents):
            ranges += [np.full(int(np.prod(shape)), 2.0**k) for _, shape in layer.param_shapes]
        self._range = np.concatenate(ranges)  # 2**k of each parameter's layer, float64
        self._inv_range = 1.0 / self._range  # exact: powers of two
        self._update_constants: tuple | None = None  # (scale, factor, low, high) of add_stochastic, see step()
        self.grad = np.zeros(self.size, dtype=float_dtype)
        self.grad_half = np.zeros(self.size, dtype=float_dtype)
        self._load(self._initial_values(), rounding="stochastic")

    # -- precision -----------------------------------------------------------

    @property
    def bits(self) -> int:
        """Training precision n (32 = float32)."""
        return self._bits

    def set_bits(self, bits: int) -> None:
        """Switch to ``bits``, putting the weights onto the new grid (round to nearest)."""
        values = self._state_values()
        self._bits = check_bits(bits)
        self.numerics.set_bits(self._bits)
        self._load(values, rounding="nearest")

    @property
    def exponents(self) -> dict[str, int]:
        """Exponent of each parameter's grid by name ("0.weight", "0.bias", ...): real value = integer * 2**exponent.

        Weight and bias of a layer share it, ``k - (n-1)`` for the layer's range
        ``2**k`` (``k`` at n = 1). Empty at 32 bits (plain float32). The one
        place the per-layer scale is defined; exporters read it from here.
        """
        if self._bits == FLOAT_BITS:
            return {}
        out = {}
        for layer, k in zip(self._params, self.range_exponents):
            for suffix, _ in layer.param_shapes:
                out[f"{self.layers.index(layer)}.{suffix}"] = weight_exponent(self._bits, k)
        return out

    def get_integers(self) -> dict[str, np.ndarray]:
        """The grid integers by name (int32; n < 32 only): ``get_weights(quantized=True)[name] == q * 2**exponents[name]``."""
        if self._bits == FLOAT_BITS:
            raise ValueError("a float32 network (bits = 32) has no integer grid")
        return {name: value.astype(np.int32) for name, value in zip(self.param_shapes, self._views(self._q))}

    # -- weights ---------------------------------------------------------------

    def get_weights(self, quantized: bool = False) -> dict[str, np.ndarray]:
        """Float32 copies of the parameters by name ("0.weight", "0.bias", ...), in layer order.

        In master mode the master copy, unless ``quantized`` (then the grid values the passes use).
        """
        if quantized and self._master is not None:
            return self._split(self._q * self._unit)
        return self._split(self._state_values())

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load parameters by name (all names and shapes of ``get_weights``), onto the grid by rounding to nearest."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of name -> array, got {type(weights).__name__}")
        missing = [name for name in self.param_shapes if name not in weights]
        extra = [name for name in weights if name not in self.param_shapes]
        if missing or extra:
            raise ValueError(f"weights do not match {self.arch.name!r}: missing {missing or 'none'}, "
                             f"unexpected {extra or 'none'}")
        flat = np.empty(self.size, dtype=np.float64)
        offset = 0
        for name, shape in self.param_shapes.items():
            value = np.asarray(weights[name], dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"weight {name!r} must have shape {shape}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"weight {name!r} holds non-finite values")
            flat[offset:offset + value.size] = value.ravel()
            offset += value.size
        self._load(flat, rounding="nearest")

    # -- inference -------------------------------------------------------------

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Logits, shape (N, classes), of inputs ``x`` shaped (N, *input_shape) or (N, features).

        Float32, or float64 where the network computes in float64 (from 10 bits, or ``float_dtype``).
        """
        x = self.as_batch(x)
        if len(x) <= batch_size:
            return self._forward(x, train=False)
        return np.concatenate([self._forward(x[i:i + batch_size], train=False) for i in range(0, len(x), batch_size)])

    def as_batch(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a float batch of shape (N, *input_shape); flat samples of the right size are reshaped."""
        x = np.asarray(x)
        shape = self.arch.input_shape
        sample = int(np.prod(shape))
        if x.ndim >= 1 and x.shape[1:] != shape:
            if x.ndim >= 2 and int(np.prod(x.shape[1:])) == sample:
                x = x.reshape(len(x), *shape)
            else:
                flat = "" if len(shape) == 1 else f" or (N, {sample})"
                raise ValueError(f"model {self.arch.name!r} expects inputs of shape (N, {', '.join(map(str, shape))})"
                                 f"{flat}, got {x.shape}")
        if x.ndim == 0:
            raise ValueError(f"model {self.arch.name!r} expects a batch of inputs, got a scalar")
        if x.dtype.kind not in "fiub":
            raise TypeError(f"inputs must be numbers, got dtype {x.dtype}")
        return x.astype(self._float_dtype if self._bits == FLOAT_BITS else carrier_dtype(self._bits), copy=False)

    # -- training interface (used by edge.trainer) ----------------------------

    def quantize_inputs(self, x: np.ndarray) -> Fixed:
        """Inputs checked (:meth:`as_batch`) and put once onto the n-bit grid, one scale for all of them.

        Training quantizes its data set once instead of every batch; index
        ``.q`` to take a batch (at 32 bits the inputs stay float32). Images
        come back channels-last, ``(N, H, W, C)``, the layout the layers use.
        """
        x = _channels_last(self.as_batch(x))
        if self._bits == FLOAT_BITS:
            return Fixed(np.ascontiguousarray(x), 0)
        return requantize(x, 0, self._bits)

    def backprop(self, x: np.ndarray | Fixed, y: np.ndarray, split: int | None = None) -> float:
        """Forward and backward pass on one batch; returns the mean loss and fills ``self.grad``.

        The hot path: ``x`` must come from :meth:`as_batch` (or be a batch of
        :meth:`quantize_inputs`), ``y`` be int labels.
        ``self.grad`` (flat, float32 unless ``float_dtype``, in layer order) receives dL/dw of the
        batch. With ``split = h`` (0 < h < len(x)), ``self.grad_half`` also
        receives the share of the first h samples (for variance estimates).
        """
        logits = self._forward(x, train=True)
        low_bits = self._bits <= LOW_BITS
        if low_bits:  # the sum over the batch, on its n-bit grid; divided by B below
            loss, probabilities = softmax_probabilities(logits, y)
            g = quantized_loss_gradient(probabilities, y, self._bits, self._uniform)
        else:
            loss, error = softmax_cross_entropy(logits, y)
            g = Fixed(error, 0)
        for index in range(len(self.layers) - 1, self._first_param - 1, -1):
            g = self.layers[index].backward(g, need_input_grad=index > self._first_param, split=split)
        if low_bits:
            mean = self.grad.dtype.type(1.0 / len(y))
            self.grad *= mean
            if split is not None:
                self.grad_half *= mean
        if split is not None:
            self.grad += self.grad_half
        return loss

    def step(self, update: np.ndarray, scale: float = 1.0) -> None:
        """Add ``scale * update`` (flat, real-valued, layer order like ``grad``) to the weights, onto the grid.

            >>> net.step(net.grad, scale=-0.1)    # one SGD step  # doctest: +SKIP
        """
        if self._bits == FLOAT_BITS:
            self._q += update * scale if scale != 1.0 else update
        elif self._master is not None:
            self._master += update * scale if scale != 1.0 else update
            np.maximum(self._master, self._master_low, out=self._master)  # a clip, at half np.clip's cost
            np.minimum(self._master, self._master_high, out=self._master)
            quantize_weights(self._master * self._master_inv, self._bits, out=self._q)
        elif self._bits == 1:
            update_weights(self._q, update, 1, self._uniform, (self._inv_range * scale).astype(self._q.dtype))
        else:
            cached = self._update_constants
            if cached is None or cached[0] != scale:
                factor = (self._inv_range * scale).astype(self._q.dtype) * float(1 << (self._bits - 1))
                cached = self._update_constants = (scale, factor, *grid_limits(self._bits, self.size, self._q.dtype))
            add_stochastic(self._q, update, *cached[1:], self._uniform)

    def snapshot(self) -> np.ndarray:
        """A copy of the trainable state, for :meth:`delta_since`."""
        return (self._q if self._master is None else self._master).copy()

    def delta_since(self, snapshot: np.ndarray) -> dict[str, np.ndarray]:
        """Weights now minus weights at ``snapshot``, by name, float32 (exact in int mode)."""
        if self._master is not None:
            return self._split(self._master - snapshot)
        diff = self._q - snapshot
        if self._bits != FLOAT_BITS:
            diff *= self._unit
        return self._split(diff)

    # -- internals ---------------------------------------------------------------

    def _forward(self, x: np.ndarray | Fixed, train: bool) -> np.ndarray:
        if isinstance(x, Fixed):
            fx = x
        elif self._bits == FLOAT_BITS:
            fx = Fixed(_channels_last(x), 0)
        else:  # raw inputs go onto the grid training puts its data on, not through the activation rule
            fx = self.quantize_inputs(x)
        for layer in self.layers:
            fx = layer.forward(fx, train)
        return fx.q * power_of_two(fx.exponent, fx.q.dtype) if fx.exponent else fx.q

    def _initial_values(self) -> np.ndarray:
        """He-normal weights (std sqrt(2 / fan_in)) and zero biases, flat, float64."""
        parts = []
        for layer in self._params:
            (_, w_shape), (_, b_shape) = layer.param_shapes
            parts.append(self.rng.normal(0.0, np.sqrt(2.0 / layer.fan_in), int(np.prod(w_shape))))
            parts.append(np.zeros(int(np.prod(b_shape))))
        return np.concatenate(parts)

    def _state_values(self) -> np.ndarray:
        """The trainable state as real values (a new float64 array)."""
        if self._master is not None:
            return self._master.astype(np.float64)
        if self._bits == FLOAT_BITS:
            return self._q.astype(np.float64)
        return self._q * self._unit

    def _load(self, values: np.ndarray, rounding: Rounding) -> None:
        """Set the state from real values at the current precision and rebind the layers' views."""
        bits = self._bits
        self._master = None
        self._update_constants = None
        if bits == FLOAT_BITS:
            self._q = values.astype(self._float_dtype)
        elif self.mode == "master":
            dtype = carrier_dtype(bits)
            self._master_low, self._master_high = (-self._range).astype(dtype), self._range.astype(dtype)
            self._master_inv = self._inv_range.astype(dtype)
            self._master = np.clip(values, -self._range, self._range).astype(dtype)
            self._q = quantize_weights(self._master * self._master_inv, bits)
        else:
            self._q = quantize_weights(values * self._inv_range, bits, rounding, self.rng)
        if bits != FLOAT_BITS:
            self._unit = self._range * weight_scale(bits)  # real value of integer 1, per parameter
        views = self._views(self._q), self._views(self.grad), self._views(self.grad_half)
        for i, layer in enumerate(self._params):
            layer.weight_exponent = 0 if bits == FLOAT_BITS else weight_exponent(bits, self.range_exponents[i])
            layer.bind(views[0][2 * i:2 * i + 2], views[1][2 * i:2 * i + 2], views[2][2 * i:2 * i + 2])

    def _views(self, flat: np.ndarray) -> list[np.ndarray]:
        out, offset = [], 0
        for shape in self.param_shapes.values():
            size = int(np.prod(shape))
            out.append(flat[offset:offset + size].reshape(shape))
            offset += size
        return out

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        flat = flat.astype(np.float32)  # always a fresh array, so the views below are private
        return dict(zip(self.param_shapes, self._views(flat)))

    def __repr__(self) -> str:
        return f"Network({self.arch.name!r}, bits={self._bits}, mode={self.mode!r}, params={self.size})"


def _channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` images as the layers take them, ``(N, H, W, C)`` (a view); other shapes as they are."""
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _build_layers(arch: specs.Architecture, numerics: Numerics) -> list:
    """One layer object per spec of ``arch``."""
    layers: list = []
    shape = arch.input_shape
    nonnegative = False  # is the current tensor known to be >= 0?
    for spec, out_shape in zip(arch.layers, arch.shapes()):
        if isinstance(spec, specs.Dense):
            layer = Dense(shape[0], spec.units, numerics)
        elif isinstance(spec, specs.Conv2D):
            layer = Conv2D(shape, spec.filters, spec.kernel, spec.stride, spec.padding, numerics)
        elif isinstance(spec, specs.ReLU):
            layer = ReLU()
        elif isinstance(spec, specs.LeakyReLU):
            layer = LeakyReLU(spec.slope)
        elif isinstance(spec, specs.MaxPool):
            layer = MaxPool(spec.size)
        elif isinstance(spec, specs.Flatten):
            layer = Flatten()
        else:
            raise TypeError(f"unknown layer spec {spec!r} in architecture {arch.name!r}")
        if isinstance(layer, Parametric):
            layer.nonnegative_input = nonnegative
        nonnegative = layer.nonnegative_output or (nonnegative and isinstance(layer, (MaxPool, Flatten)))
        layers.append(layer)
        shape = out_shape
    return layers
