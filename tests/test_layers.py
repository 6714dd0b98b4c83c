"""Layers: backward passes against numerical gradients, exact fixed-point products, and size counts."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from edge.fixedpoint import Fixed, requantize, weight_exponent
from edge.gemm import int_matmul
from edge.layers import Conv2D, Dense, Flatten, LeakyReLU, MaxPool, Numerics, Parametric, ReLU, softmax_cross_entropy
from edge.network import Network
from models import counts, get_architecture

FLOAT64_EPS = 1e-6


def numerics(bits: int = 32, error_rounding: str = "nearest") -> Numerics:
    return Numerics(bits, error_rounding, np.random.default_rng(0))  # type: ignore[arg-type]


def bind(layer: Parametric, rng: np.random.Generator, dtype: type = np.float64) -> tuple[list, list, list]:
    """Random parameters for ``layer`` (float64 for gradient checks); returns (values, grads, halves)."""
    values = [rng.normal(0, 0.5, shape).astype(dtype) for _, shape in layer.param_shapes]
    grads = [np.zeros(shape, dtype=dtype) for _, shape in layer.param_shapes]
    halves = [np.zeros(shape, dtype=dtype) for _, shape in layer.param_shapes]
    layer.bind(values, grads, halves)
    return values, grads, halves


def numeric_grad(f: Callable[[], float], array: np.ndarray, eps: float = FLOAT64_EPS) -> np.ndarray:
    grad = np.zeros_like(array)
    flat, out = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        out[i] = (plus - minus) / (2 * eps)
    return grad


def check_layer(layer: object, x: np.ndarray, params: list[np.ndarray] | None = None,
                grads: list[np.ndarray] | None = None) -> None:
    """Backward of ``layer`` at 32 bits (float64 arrays) against central differences of sum(forward * r)."""
    rng = np.random.default_rng(1)
    r = rng.normal(size=layer.forward(Fixed(x, 0), False).q.shape)  # type: ignore[attr-defined]

    def f() -> float:
        return float((layer.forward(Fixed(x, 0), False).q * r).sum())  # type: ignore[attr-defined]

    layer.forward(Fixed(x, 0), True)  # type: ignore[attr-defined]
    dx = layer.backward(Fixed(r, 0), True, None)  # type: ignore[attr-defined]
    np.testing.assert_allclose(dx.q, numeric_grad(f, x), rtol=1e-6, atol=1e-8)
    for value, grad in zip(params or [], grads or []):
        np.testing.assert_allclose(grad, numeric_grad(f, value), rtol=1e-6, atol=1e-8)


def test_dense_backward_matches_numerical_gradients() -> None:
    rng = np.random.default_rng(0)
    layer = Dense(7, 5, numerics())
    values, grads, _ = bind(layer, rng)
    check_layer(layer, rng.normal(size=(4, 7)), values, grads)


@pytest.mark.parametrize("channels, kernel, stride, padding", [(1, 3, 1, 1), (3, 3, 1, 1), (2, 3, 2, 1), (3, 2, 1, 0),
                                                               (1, 3, 2, 0), (2, 3, 3, 2)])
def test_conv2d_backward_matches_numerical_gradients(channels: int, kernel: int, stride: int, padding: int) -> None:
    rng = np.random.default_rng(channels * 10 + stride)
    layer = Conv2D((channels, 6, 5), 4, kernel, stride, padding, numerics())
    values, grads, _ = bind(layer, rng)
    check_layer(layer, rng.normal(size=(3, 6, 5, channels)), values, grads)  # images are channels-last inside


def reference_conv(x_nchw: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Direct cross-correlation, (N, C, H, W) in, (N, F, OH, OW) out, in the dtype of the inputs."""
    n, c, h, wd = x_nchw.shape
    f, _, k, _ = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding), dtype=x_nchw.dtype)
    xp[:, :, padding:padding + h, padding:padding + wd] = x_nchw
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    out = np.zeros((n, f, oh, ow), dtype=x_nchw.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def test_conv2d_computes_the_cross_correlation_of_its_weight_layout() -> None:
    rng = np.random.default_rng(4)
    layer = Conv2D((3, 7, 6), 5, 3, 2, 1, numerics())
    (w, b), _, _ = bind(layer, rng)
    x = rng.normal(size=(2, 3, 7, 6))
    got = layer.forward(Fixed(x.transpose(0, 2, 3, 1), 0), False).q.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, reference_conv(x, w, b, 2, 1), rtol=1e-12, atol=1e-12)


def test_quantized_conv2d_is_exact_integer_arithmetic() -> None:
    rng = np.random.default_rng(5)
    nm = numerics(8)
    layer = Conv2D((2, 6, 6), 3, 3, 1, 1, nm)
    w_int = rng.integers(-128, 128, (3, 2, 3, 3)).astype(np.float32)
    b_int = rng.integers(-128, 128, 3).astype(np.float32)
    zeros = [np.zeros_like(w_int), np.zeros_like(b_int)]
    layer.bind([w_int, b_int], zeros, [z.copy() for z in zeros])
    layer.weight_exponent = weight_exponent(8, -1)  # a layer range of 2**-1
    x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    out = layer.forward(Fixed(x, 0), False)
    xq = requantize(x, 0, 8, asymmetric=True)  # a signed input: asymmetric codes
    # integer reference: accumulator plus the bias moved to the accumulator's exponent
    ref = reference_conv(xq.q.transpose(0, 3, 1, 2).astype(np.int64), w_int.astype(np.int64),
                         b_int.astype(np.int64) * 2 ** -xq.exponent, 1, 1)
    assert out.exponent == xq.exponent + weight_exponent(8, -1) == xq.exponent - 8
    assert out.q.transpose(0, 3, 1, 2).astype(np.int64).tolist() == ref.tolist()


def test_quantized_dense_forward_and_backward_are_exact_products() -> None:
    rng = np.random.default_rng(6)
    nm = numerics(6)
    layer = Dense(20, 7, nm)
    w_int = rng.integers(-32, 32, (20, 7)).astype(np.float32)
    b_int = rng.integers(-32, 32, 7).astype(np.float32)
    grads = [np.zeros_like(w_int), np.zeros_like(b_int)]
    layer.bind([w_int, b_int], grads, [np.zeros_like(w_int), np.zeros_like(b_int)])
    layer.weight_exponent = weight_exponent(6, -2)
    x = rng.normal(size=(9, 20)).astype(np.float32)
    out = layer.forward(Fixed(x, 0), True)
    xq = requantize(x, 0, 6, asymmetric=True)
    x_int, w64 = xq.q.astype(np.int64), w_int.astype(np.int64)
    bias = b_int.astype(np.int64) * 2 ** -xq.exponent
    assert out.q.astype(np.int64).tolist() == (int_matmul(x_int, w64) + bias).tolist()
    err = rng.normal(size=(9, 7)).astype(np.float32)
    dx = layer.backward(Fixed(err, 0), True, None)
    gq = requantize(err, 0, 6)  # nearest rounding: the same integers the layer used
    g_int = gq.q.astype(np.int64)
    expected_w = int_matmul(x_int.T.copy(), g_int) * 2.0 ** (xq.exponent + gq.exponent)
    np.testing.assert_array_equal(grads[0], expected_w.astype(np.float32))
    np.testing.assert_array_equal(grads[1], (g_int.sum(axis=0) * 2.0**gq.exponent).astype(np.float32))
    assert dx.exponent == gq.exponent + weight_exponent(6, -2)
    assert dx.q.astype(np.int64).tolist() == int_matmul(g_int, w64.T.copy()).tolist()


def test_split_gradients_add_up_to_the_full_batch() -> None:
    rng = np.random.default_rng(7)
    for layer in (Dense(6, 4, numerics()), Conv2D((2, 5, 5), 3, 3, 1, 1, numerics())):
        _, grads, halves = bind(layer, rng)
        shape = (6, 6) if isinstance(layer, Dense) else (6, 5, 5, 2)
        x = rng.normal(size=shape)
        out = layer.forward(Fixed(x, 0), True)
        r = rng.normal(size=out.q.shape)
        layer.backward(Fixed(r, 0), True, None)
        full = [g.copy() for g in grads]
        layer.backward(Fixed(r, 0), True, 2)
        for whole, second, first in zip(full, grads, halves):
            np.testing.assert_allclose(first + second, whole, rtol=1e-12, atol=1e-12)
            assert not np.allclose(first, whole)


@pytest.mark.parametrize("layer", [ReLU(), LeakyReLU(0.125), LeakyReLU(0.5)], ids=repr)
def test_activation_backward_matches_numerical_gradients(layer: object) -> None:
    x = np.random.default_rng(8).normal(size=(5, 6))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_layer(layer, x)


def test_leaky_relu_needs_a_power_of_two_slope() -> None:
    with pytest.raises(ValueError, match="power of two"):
        LeakyReLU(0.1)
    with pytest.raises(ValueError, match="power of two"):
        LeakyReLU(1.0)


def test_conv2d_rejects_padding_not_smaller_than_the_kernel() -> None:
    with pytest.raises(ValueError, match="padding"):
        Conv2D((1, 8, 8), 4, 3, 1, 3, numerics())


def test_maxpool_backward_matches_numerical_gradients() -> None:
    x = np.random.default_rng(9).permutation(3 * 4 * 6 * 2).reshape(3, 4, 6, 2) / 7.0  # no ties
    check_layer(MaxPool(2), x)


def test_maxpool_routes_ties_to_the_first_maximum() -> None:
    pool = MaxPool(2)
    x = np.array([[1, 3], [3, 2]], dtype=np.float32).reshape(1, 2, 2, 1)
    out = pool.forward(Fixed(x, 0, 4), True)
    assert out.q.ravel().tolist() == [3.0] and out.bound == 4
    dx = pool.backward(Fixed(np.array([[[[5.0]]]], dtype=np.float32), -2), True, None)
    assert dx.q.reshape(2, 2).tolist() == [[0, 5], [0, 0]] and dx.exponent == -2


def test_flatten_restores_channel_major_order() -> None:
    x_nchw = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    flat = Flatten()
    out = flat.forward(Fixed(x_nchw.transpose(0, 2, 3, 1), 0), True)
    np.testing.assert_array_equal(out.q, x_nchw.reshape(2, -1))
    back = flat.backward(Fixed(out.q, 0), True, None)
    np.testing.assert_array_equal(back.q, x_nchw.transpose(0, 2, 3, 1))


def test_softmax_cross_entropy_and_its_gradient() -> None:
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    loss, grad = softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), labels]).mean(), rel=1e-12)
    np.testing.assert_allclose(grad, numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits),
                               rtol=1e-6, atol=1e-9)
    big, _ = softmax_cross_entropy(np.array([[1000.0, -1000.0]]), np.array([1]))  # no overflow
    assert big == pytest.approx(2000.0)


@pytest.mark.parametrize("name, float_dtype", [(name, np.float64) for name in ("mlp", "cnn", "mlp-mnist", "cnn-mnist")]
                         + [("mlp", np.float32), ("mlp-mnist", np.float32)])
def test_whole_network_backward_at_32_bits(name: str, float_dtype: type) -> None:
    """The wiring of a whole network (layer order, layouts, names) against finite differences.

    In float64 with small steps. In float32, whose rounding needs steps of
    1e-3, only the MLPs: max-pool near-ties closer than that make finite
    differences of the CNNs meaningless; coordinates next to a ReLU kink
    (where two step sizes disagree) are skipped.
    """
    arch = get_architecture(name)
    net = Network(arch, bits=32, seed=3, float_dtype=float_dtype)
    net.set_weights(net.get_weights())  # float32-exact values, so that set_weights below changes one at a time
    rng = np.random.default_rng(11)
    x = rng.random((3, *arch.input_shape)).astype(float_dtype)
    y = rng.integers(0, 10, 3)
    net.backprop(x, y)
    analytic = net.grad.copy()
    weights = net.get_weights()
    steps = (1e-6, 2e-6) if float_dtype is np.float64 else (5e-4, 1e-3)
    offset, checked, skipped = 0, 0, 0
    for param, value in weights.items():
        for i in rng.choice(value.size, size=min(6, value.size), replace=False):
            def loss_at(delta: float) -> float:
                arr = value.astype(np.float64).reshape(-1)
                arr[i] += delta
                net.set_weights({**weights, param: arr.reshape(value.shape)})
                return softmax_cross_entropy(net.predict(x).astype(np.float64), y)[0]

            fine, coarse = [(loss_at(eps) - loss_at(-eps)) / (2 * eps) for eps in steps]
            if abs(fine - coarse) > 0.02 * abs(coarse) + 3e-4:
                skipped += 1
                continue
            assert analytic[offset + i] == pytest.approx(fine, rel=1e-4 if float_dtype is np.float64 else 0.02,
                                                         abs=1e-7 if float_dtype is np.float64 else 3e-4), (param, i)
            checked += 1
        offset += value.size
    net.set_weights(weights)
    assert checked >= 2 * len(weights)
    if float_dtype is np.float64:
        assert skipped == 0


# The paper's size symbols, counted by hand from models/architectures.py:
#   mlp        64-32-10:       d = 64*32+32 + 32*10+10, N_c = 64*32 + 32*10, O_c = 32 + 10
#   mlp-mnist  784-128-10:     d = 784*128+128 + 128*10+10, N_c = 784*128 + 128*10, O_c = 128 + 10
#   cnn        1x8x8:   conv 1->8 (3x3, pad 1) out 8x8x8, pool, conv 8->16 out 16x4x4, pool, dense 64->10
#   cnn-mnist  1x28x28: conv 1->8 out 8x28x28, pool, conv 8->16 out 16x14x14, pool, dense 784->10
HAND_COUNTS = {
    "mlp": dict(params=2048 + 32 + 320 + 10, macs=2048 + 320, activations=42, input_size=64),
    "mlp-mnist": dict(params=100352 + 128 + 1280 + 10, macs=100352 + 1280, activations=138, input_size=784),
    "cnn": dict(params=(9 * 8 + 8) + (72 * 16 + 16) + (64 * 10 + 10), macs=9 * 8 * 64 + 72 * 16 * 16 + 640,
                activations=8 * 64 + 16 * 16 + 10, input_size=64),
    "cnn-mnist": dict(params=(9 * 8 + 8) + (72 * 16 + 16) + (784 * 10 + 10), macs=9 * 8 * 784 + 72 * 16 * 196 + 7840,
                      activations=8 * 784 + 16 * 196 + 10, input_size=784),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_counts_match_hand_counts_and_the_network(name: str) -> None:
    arch = get_architecture(name)
    c = counts(arch)
    assert (c.params, c.macs, c.activations, c.input_size) == tuple(HAND_COUNTS[name].values())
    net = Network(arch, bits=8)
    assert net.size == c.params == sum(v.size for v in net.get_weights().values())
