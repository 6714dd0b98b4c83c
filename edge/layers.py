"""Layers of a fixed-point network, each with its forward and backward side by side.

Tensors flow between layers as :class:`Fixed` pairs ``(q, exponent)``, real
value ``q * 2**exponent``, held exactly in a float array. Dense and Conv2D
put their input (forward) and their incoming error (backward) onto an n-bit
grid with a dynamic exponent, multiply integers exactly (``edge.gemm``) and
hand on the wide accumulator; ReLU, leaky ReLU (power-of-two slope), max-pool
and flatten change no value's precision. So the only rounding in a training
step happens at the inputs of the matrix products, and in the weight update.

At ``bits = 32`` every quantizer is the identity and the products are plain
float32 matmuls: the same code is the float32 baseline.

Weight shapes: Dense ``(inputs, units)`` for ``y = x W + b``; Conv2D
``(filters, channels, k, k)``; biases ``(units,)`` / ``(filters,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge.fixedpoint import FLOAT_BITS, Fixed, RandomSource, Rounding, power_of_two, requantize
from edge.gemm import accumulate, product_bound
from edge.lowbit import LOW_BITS, least_error_activations, unclipped


class Numerics:
    """The precision every layer of one network computes at (shared, changed by ``set_bits``)."""

    def __init__(self, bits: int, error_rounding: Rounding, rng: RandomSource) -> None:
        self.error_rounding = error_rounding
        self.rng = rng
        self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        """Switch to ``bits`` (1..32)."""
        self.bits = bits
        self.exact = bits < FLOAT_BITS
        self.weight_bound = 1 if bits == 1 else 1 << (bits - 1)  # largest |integer| on the weight grid

    def activations(self, x: Fixed, nonnegative: bool = False) -> Fixed:
        """``x`` on the n-bit grid, rounded to nearest (as it is at 32 bits or when already on a grid).

        Unsigned if it has no negative value, else asymmetric (unsigned codes with a zero point).
        At n <= 3 the exponent is the one with the least error (:mod:`edge.lowbit`).
        """
        if not self.exact or x.bound:
            return x
        if self.bits <= LOW_BITS:
            return least_error_activations(x.q, x.exponent, self.bits, nonnegative)
        return requantize(x.q, x.exponent, self.bits, "nearest", nonnegative=nonnegative, asymmetric=True)

    def errors(self, g: Fixed) -> Fixed:
        """A backward error on the n-bit grid, rounded as configured (identity at 32 bits or when already on a grid)."""
        if not self.exact or g.bound:
            return g
        return requantize(g.q, g.exponent, self.bits, self.error_rounding, self.rng)

    def matmul(self, a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
        """``a @ b``: exact integer product if quantized (``bound`` caps every partial sum), else float."""
        return accumulate(a, b, bound) if self.exact else a @ b

    def aligned_bound(self, product: int, x_exponent: int) -> int:
        """Bound, in units of the finer grid, on an accumulator plus a bias aligned to it."""
        if x_exponent >= 0:
            return (product << x_exponent) + self.weight_bound
        return product + (self.weight_bound << -x_exponent)


class Layer:
    """What every layer has; each defines ``forward(x, train) -> Fixed`` and ``backward(g, ...)``.

    ``backward(g, need_input_grad=True, split=None)`` takes the error of the
    layer's output and returns that of its input (None when not needed);
    layers with parameters also write their gradients (see
    :meth:`Parametric.bind`).
    """

    param_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    nonnegative_output = False  # promises q >= 0, which saves the next quantizer a pass


class Parametric(Layer):
    """A layer with a weight and a bias bound as views into the network's flat buffers."""

    nonnegative_input = False
    _keep: np.ndarray | None = None  # training at n <= 3: where the input grid held the input (see _input_on_grid)
    weight_exponent = 0
    """Exponent of this layer's weight and bias grid (set by the network; 0 at 32 bits)."""

    def bind(self, values: list[np.ndarray], grads: list[np.ndarray], halves: list[np.ndarray]) -> None:
        """Use ``values`` (weight, bias) as parameters and write gradients into ``grads``.

        With a ``split`` in :meth:`backward`, the gradient of the first part of
        the batch goes to ``halves`` and that of the rest to ``grads``.
        """
        self.w, self.b = values
        self.grad_w, self.grad_b = grads[0].reshape(len(grads[0]), -1), grads[1]
        self.half_w, self.half_b = halves[0].reshape(len(halves[0]), -1), halves[1]

    def _input_on_grid(self, x: Fixed, train: bool) -> Fixed:
        """The layer's input on the n-bit grid; in training at n <= 3 also notes which values the grid saturated."""
        rounded = self.numerics.activations(x, self.nonnegative_input)
        low_bits = train and rounded is not x and self.numerics.bits <= LOW_BITS
        self._keep = unclipped(x, rounded) if low_bits else None
        return rounded

    def _input_gradient(self, dx: np.ndarray, exponent: int) -> Fixed:
        """The error of the layer's input: no gradient through the values its grid saturated (:func:`unclipped`)."""
        if self._keep is not None:
            dx *= self._keep
        return Fixed(dx, exponent)

    def _bias_added(self, acc: np.ndarray, x_exponent: int) -> np.ndarray:
        # The bias lives at the weights' exponent e_w, the accumulator at e_x + e_w.
        acc += self.b * power_of_two(-x_exponent, self.b.dtype) if x_exponent else self.b
        return acc

    def _param_grads(self, left: np.ndarray, right: np.ndarray, errors: np.ndarray, w_exponent: int,
                     g_exponent: int, term_bound: int, split_rows: int | None) -> None:
        """Weight gradient ``left @ right`` and bias gradient (column sums of ``errors``), at their exponents.

        Rows of ``errors`` (= columns of ``left`` = rows of ``right``) are the
        batch's terms; ``term_bound`` caps the product of one input and one
        error integer. ``split_rows`` writes the first that many rows' share
        into the half buffers and the rest into the gradients.
        """
        if split_rows is None:
            self._grads_into(left, right, errors, w_exponent, g_exponent, term_bound, self.grad_w, self.grad_b)
            return
        cut = split_rows
        self._grads_into(left[:, :cut], right[:cut], errors[:cut], w_exponent, g_exponent, term_bound,
                         self.half_w, self.half_b)
        self._grads_into(left[:, cut:], right[cut:], errors[cut:], w_exponent, g_exponent, term_bound,
                         self.grad_w, self.grad_b)

    def _grads_into(self, left: np.ndarray, right: np.ndarray, errors: np.ndarray, w_exponent: int,
                    g_exponent: int, term_bound: int, out_w: np.ndarray, out_b: np.ndarray) -> None:
        # Gradients are exact in the accumulator and rounded once, to float32, when stored.
        if self.numerics.exact:
            product = accumulate(left, right, len(right) * term_bound)
            np.multiply(product, power_of_two(w_exponent, product.dtype), out=out_w)
            sums = np.add.reduce(errors, axis=0)
            np.multiply(sums, power_of_two(g_exponent, sums.dtype), out=out_b)
        else:
            np.matmul(left, right, out=out_w)
            np.add.reduce(errors, axis=0, out=out_b)


class Dense(Parametric):
    """``y = x W + b`` with ``W`` of shape ``(inputs, units)``."""

    def __init__(self, inputs: int, units: int, numerics: Numerics) -> None:
        self.inputs, self.units, self.numerics = inputs, units, numerics
        self.param_shapes = (("weight", (inputs, units)), ("bias", (units,)))
        self.fan_in = inputs

    def forward(self, x: Fixed, train: bool) -> Fixed:
        nm = self.numerics
        x = self._input_on_grid(x, train)
        if train:
            self._x = x
        bound = nm.aligned_bound(product_bound(self.inputs, x.bound, nm.weight_bound), x.exponent)
        acc = nm.matmul(x.q, self.w, bound)
        return Fixed(self._bias_added(acc, x.exponent), x.exponent + self.weight_exponent)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed | None:
        nm = self.numerics
        g = nm.errors(g)
        x = self._x
        self._param_grads(x.q.T, g.q, g.q, x.exponent + g.exponent, g.exponent, x.bound * g.bound, split)
        if not need_input_grad:
            return None
        bound = product_bound(self.units, g.bound, nm.weight_bound)
        return self._input_gradient(nm.matmul(g.q, self.w.T, bound), g.exponent + self.weight_exponent)

    def __repr__(self) -> str:
        return f"Dense({self.inputs} -> {self.units})"


class Conv2D(Parametric):
    """2-D convolution by im2col: one matrix product of all patches with the kernel.

    Images flow channels-last, ``(B, H, W, C)``; the weight keeps the
    ``(filters, C, k, k)`` shape of ``get_weights``. The input gradient is
    itself a convolution: of the error, zero-stuffed for the stride and
    padded, with the kernel flipped and its channel axes swapped.
    """

    def __init__(self, in_shape: tuple[int, int, int], filters: int, kernel: int, stride: int, padding: int,
                 numerics: Numerics) -> None:
        if not 0 <= padding < kernel:
            raise ValueError(f"Conv2D padding must be between 0 and kernel - 1 = {kernel - 1}, got {padding}")
        self.in_shape, self.filters, self.kernel = in_shape, filters, kernel
        self.stride, self.padding, self.numerics = stride, padding, numerics
        c, h, w = in_shape
        self.out_hw = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        self.patch = c * kernel * kernel
        self.param_shapes = (("weight", (filters, c, kernel, kernel)), ("bias", (filters,)))
        self.fan_in = self.patch

    def bind(self, values: list[np.ndarray], grads: list[np.ndarray], halves: list[np.ndarray]) -> None:
        """As :meth:`Parametric.bind`; gradients are written through ``(F, k, k, C)`` views."""
        self.w, self.b = values
        self.grad_w, self.grad_b = grads[0].transpose(0, 2, 3, 1), grads[1]
        self.half_w, self.half_b = halves[0].transpose(0, 2, 3, 1), halves[1]

    def forward(self, x: Fixed, train: bool) -> Fixed:
        nm = self.numerics
        x = self._input_on_grid(x, train)
        batch, h, w, c = x.q.shape
        p = self.padding
        padded = x.q
        if p:
            padded = np.zeros((batch, h + 2 * p, w + 2 * p, c), dtype=x.q.dtype)
            padded[:, p:p + h, p:p + w, :] = x.q
        cols = _patches(padded, self.kernel, self.stride)  # (B*OH*OW, k*k*C)
        kernel = self.w.transpose(2, 3, 1, 0).reshape(-1, self.filters)  # (k*k*C, F)
        if train:
            self._cols, self._x = cols, x
        bound = nm.aligned_bound(product_bound(self.patch, x.bound, nm.weight_bound), x.exponent)
        acc = self._bias_added(nm.matmul(cols, kernel, bound), x.exponent)
        return Fixed(acc.reshape(batch, *self.out_hw, self.filters), x.exponent + self.weight_exponent)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed | None:
        nm = self.numerics
        g = nm.errors(g)
        batch, oh, ow, f = g.q.shape
        rows = g.q.reshape(-1, f)  # one row per output pixel
        x = self._x
        self._param_grads(rows.T, self._cols, rows, x.exponent + g.exponent, g.exponent, x.bound * g.bound,
                          None if split is None else split * oh * ow)
        if not need_input_grad:
            return None
        k, s, (c, h, w) = self.kernel, self.stride, self.in_shape
        off = k - 1 - self.padding
        stuffed = np.zeros((batch, h + k - 1, w + k - 1, f), dtype=g.q.dtype)
        stuffed[:, off:off + (oh - 1) * s + 1:s, off:off + (ow - 1) * s + 1:s, :] = g.q
        flipped = self.w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(-1, c)  # (k*k*F, C)
        bound = product_bound(k * k * f, g.bound, nm.weight_bound)
        dx = nm.matmul(_patches(stuffed, k, 1), flipped, bound)
        return self._input_gradient(dx.reshape(batch, h, w, c), g.exponent + self.weight_exponent)

    def _grads_into(self, left: np.ndarray, right: np.ndarray, errors: np.ndarray, w_exponent: int,
                    g_exponent: int, term_bound: int, out_w: np.ndarray, out_b: np.ndarray) -> None:
        # The product is (F, k*k*C); out_w is the (F, k, k, C) view of the (F, C, k, k) gradient.
        if self.numerics.exact:
            product = accumulate(left, right, len(right) * term_bound)
            np.multiply(product.reshape(out_w.shape), power_of_two(w_exponent, product.dtype), out=out_w)
            sums = np.add.reduce(errors, axis=0)
            np.multiply(sums, power_of_two(g_exponent, sums.dtype), out=out_b)
        else:
            out_w[...] = (left @ right).reshape(out_w.shape)
            np.add.reduce(errors, axis=0, out=out_b)

    def __repr__(self) -> str:
        return f"Conv2D({self.in_shape[0]} -> {self.filters}, {self.kernel}x{self.kernel}, stride {self.stride})"


def _patches(padded: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """im2col of a padded channels-last batch: one row per output pixel, columns in (ki, kj, c) order."""
    b, hp, wp, c = padded.shape
    oh, ow = (hp - kernel) // stride + 1, (wp - kernel) // stride + 1
    if c == 1:
        # One channel: k*k shifted copies with long contiguous runs beat a gather with runs of k values.
        shifted = np.empty((kernel, kernel, b, oh, ow), dtype=padded.dtype)
        for i in range(kernel):
            for j in range(kernel):
                shifted[i, j] = padded[:, i:i + stride * oh:stride, j:j + stride * ow:stride, 0]
        return shifted.reshape(kernel * kernel, b * oh * ow).T
    windows = sliding_window_view(padded, (kernel, kernel), axis=(1, 2))  # (B, OH', OW', C, k, k)
    if stride > 1:
        windows = windows[:, ::stride, ::stride]
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(b * oh * ow, kernel * kernel * c)


class ReLU(Layer):
    """``max(x, 0)``."""

    nonnegative_output = True
    _zeros: np.ndarray | None = None

    def forward(self, x: Fixed, train: bool) -> Fixed:
        zeros = self._zeros
        if zeros is None or zeros.shape != x.q.shape or zeros.dtype is not x.q.dtype:
            # numpy's maximum and comparisons run about twice as fast against a full array as against a scalar
            zeros = self._zeros = np.zeros_like(x.q)
        y = np.maximum(x.q, zeros)
        if train:
            self._active = y > zeros
        return Fixed(y, x.exponent, x.bound)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed:
        return Fixed(g.q * self._active, g.exponent)

    def __repr__(self) -> str:
        return "ReLU()"


class LeakyReLU(Layer):
    """``x`` for ``x > 0``, else ``slope * x``; with a power-of-two slope both are exact in fixed point."""

    def __init__(self, slope: float) -> None:
        mantissa, _ = np.frexp(slope)
        if not 0.0 < slope < 1.0 or mantissa != 0.5:
            raise ValueError(f"LeakyReLU slope must be a power of two below 1 (e.g. 0.125), got {slope!r}")
        self.slope = float(slope)

    def forward(self, x: Fixed, train: bool) -> Fixed:
        if train:  # the derivative: 1 where x > 0, else the slope (a multiply beats masked copies here)
            self._gain = (x.q > 0).astype(x.q.dtype)
            self._gain *= 1.0 - self.slope
            self._gain += self.slope
        y = x.q * self.slope
        return Fixed(np.maximum(x.q, y, out=y), x.exponent)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed:
        return Fixed(g.q * self._gain, g.exponent)

    def __repr__(self) -> str:
        return f"LeakyReLU({self.slope})"


class MaxPool(Layer):
    """Non-overlapping ``size x size`` max pooling; the gradient goes to the first maximum of each window."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._offsets = [(i, j) for i in range(size) for j in range(size)]

    def forward(self, x: Fixed, train: bool) -> Fixed:
        s = self.size
        out = x.q[:, 0::s, 0::s, :].copy()
        if train:
            self._shape = x.q.shape
            self._winner = np.zeros(out.shape, dtype=np.int8)  # offset index of each window's maximum
        for index, (i, j) in enumerate(self._offsets[1:], start=1):
            candidate = x.q[:, i::s, j::s, :]
            if train:
                np.putmask(self._winner, candidate > out, index)
            np.maximum(out, candidate, out=out)
        return Fixed(out, x.exponent, x.bound)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed:
        s = self.size
        dx = np.zeros(self._shape, dtype=g.q.dtype)
        for index, (i, j) in enumerate(self._offsets):
            dx[:, i::s, j::s, :] = g.q * (self._winner == index)
        return Fixed(dx, g.exponent)

    def __repr__(self) -> str:
        return f"MaxPool({self.size})"


class Flatten(Layer):
    """To ``(B, features)``; images in channel-major order ``(C, H, W)``, as ``models`` counts them."""

    def forward(self, x: Fixed, train: bool) -> Fixed:
        self._shape = x.q.shape
        q = x.q.transpose(0, 3, 1, 2) if x.q.ndim == 4 else x.q  # channels-last back to channel-major
        return Fixed(q.reshape(len(q), -1), x.exponent, x.bound)

    def backward(self, g: Fixed, need_input_grad: bool = True, split: int | None = None) -> Fixed:
        if len(self._shape) == 4:
            b, h, w, c = self._shape
            return Fixed(g.q.reshape(b, c, h, w).transpose(0, 2, 3, 1), g.exponent)
        return Fixed(g.q.reshape(self._shape), g.exponent)

    def __repr__(self) -> str:
        return "Flatten()"


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` (B, classes) against integer ``labels``, and its gradient.

    Computed in float (the exponential has no useful fixed-point form here);
    the gradient is quantized by the last layer's backward like any error.

        >>> loss, grad = softmax_cross_entropy(np.zeros((2, 4), np.float32), np.array([0, 3]))
        >>> round(loss, 4), grad.sum().item()
        (1.3863, 0.0)
    """
    loss, exp, total, picked = _softmax_parts(logits, labels)
    batch = len(logits)
    grad = exp / (total * batch)
    grad.put(picked, grad.take(picked) - 1.0 / batch)
    return loss, grad


def softmax_probabilities(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` against ``labels``, and the softmax probabilities (B, classes)."""
    loss, exp, total, _ = _softmax_parts(logits, labels)
    exp /= total
    return loss, exp


def _softmax_parts(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Loss, exp of the shifted logits, their row sums and the flat index of each row's label."""
    batch, classes = logits.shape
    shifted = logits - np.maximum.reduce(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = np.add.reduce(exp, axis=1, keepdims=True)
    picked = np.arange(0, batch * classes, classes) + labels
    loss = (float(np.log(total).sum()) - float(shifted.take(picked).sum())) / batch
    return loss, exp, total, picked
