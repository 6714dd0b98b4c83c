"""Fixed-point grids, rounding and dynamic scaling (edge.fixedpoint)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.fixedpoint import (
    asymmetric_range,
    UniformPool,
    carrier_dtype,
    check_bits,
    dequantize,
    dynamic_format,
    quantize_weights,
    requantize,
    scale_exponent,
    stochastic_round,
    update_weights,
    weight_exponent,
    weight_limits,
    weight_range_exponent,
    weight_scale,
    weight_step,
)

ALL_BITS = range(1, 32)  # 32 is float32, which has no grid


def grid(bits: int) -> np.ndarray:
    """Every integer of the weight grid (a sample of them beyond 16 bits)."""
    lo, hi = weight_limits(bits)
    if bits == 1:
        return np.array([-1.0, 1.0])
    if bits <= 16:
        return np.arange(lo, hi + 1, dtype=np.float64)
    rng = np.random.default_rng(bits)
    return np.concatenate([[lo, lo + 1, -1, 0, 1, hi - 1, hi], rng.integers(lo, hi, 5000)]).astype(np.float64)


@pytest.mark.parametrize("bits", [0, 33, -1, 2.5, True, "8", None])
def test_check_bits_rejects_what_is_not_a_bit_width(bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be a whole number from 1 to 32"):
        check_bits(bits)


def test_weight_grid_follows_the_paper() -> None:
    assert weight_step(1) == 2.0 and weight_limits(1) == (-1, 1) and weight_scale(1) == 1.0
    for bits in range(2, 32):
        assert weight_step(bits) == weight_scale(bits) == 2.0 ** -(bits - 1)
        assert weight_exponent(bits) == -(bits - 1)
        lo, hi = weight_limits(bits)
        assert lo * weight_scale(bits) == -1.0
        assert hi * weight_scale(bits) == 1.0 - weight_step(bits)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_is_exact_on_the_grid(bits: int, rounding: str) -> None:
    q = grid(bits)
    w = q * weight_scale(bits)
    got = quantize_weights(w, bits, rounding, np.random.default_rng(0))
    assert got.dtype == carrier_dtype(bits)
    np.testing.assert_array_equal(got, q)
    np.testing.assert_array_equal(got.astype(np.float64) * weight_scale(bits), w)  # dequantizes back exactly


@pytest.mark.parametrize("bits", ALL_BITS)
def test_quantize_saturates_outside_the_grid(bits: int) -> None:
    lo, hi = weight_limits(bits)
    w = np.array([1.0, 1.5, 1e9, np.inf, -1.0, -1.0 - 1e-9, -7.0, -np.inf])
    for rounding in ("nearest", "stochastic"):
        got = quantize_weights(w, bits, rounding, np.random.default_rng(1))
        assert got.tolist() == [hi] * 4 + [lo] * 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16, 24, 31])
def test_nearest_rounding_error_is_at_most_half_a_step(bits: int) -> None:
    w = np.random.default_rng(bits).uniform(-1.0, 1.0 - weight_step(bits), 100_000)
    err = quantize_weights(w, bits) * weight_scale(bits) - w
    assert np.abs(err).max() <= weight_step(bits) / 2


def test_one_bit_is_the_sign() -> None:
    w = np.array([-3.0, -0.2, -1e-12, 0.0, 1e-12, 0.7, 5.0])
    assert quantize_weights(w, 1).tolist() == [-1, -1, -1, 1, 1, 1, 1]


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.01, 0.999])
def test_stochastic_rounding_is_unbiased_with_bounded_variance(fraction: float) -> None:
    n = 1_000_000
    x = np.full(n, 5.0 + fraction)
    r = stochastic_round(x, np.random.default_rng(42))
    assert set(np.unique(r)) <= {5.0, 6.0}
    err = r - x
    p = fraction
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(err.mean()) < 5 * sigma  # E[error] = 0
    assert err.var() <= 0.25 + 5 * math.sqrt(2 / n) * 0.25  # per-coordinate p(1-p) <= 1/4 of a step squared
    assert err.var() == pytest.approx(p * (1 - p), rel=0.02, abs=1e-4)


def test_stochastic_weight_quantization_is_unbiased_on_every_grid() -> None:
    rng = np.random.default_rng(3)
    for bits in (1, 2, 4, 8):
        w = rng.uniform(-1.0, 1.0 - weight_step(bits) if bits > 1 else 1.0, 16)  # inside the grid
        draws = np.stack([quantize_weights(w, bits, "stochastic", rng) for _ in range(20_000)])
        mean = draws.mean(axis=0) * weight_scale(bits)
        step = weight_step(bits)
        assert np.abs(mean - w).max() < 5 * (step / 2) / math.sqrt(20_000)
        assert (draws.var(axis=0) * weight_scale(bits) ** 2).max() <= step**2 / 4 + 1e-3 * step**2


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_update_weights_is_unbiased_and_keeps_small_updates(bits: int) -> None:
    n = 1_000_000
    step = weight_step(bits)
    q = np.zeros(n, dtype=carrier_dtype(bits))
    delta = np.full(n, 0.01 * step, dtype=np.float32)  # far below one step
    update_weights(q, delta, bits, UniformPool(np.random.default_rng(7)))
    moved = q.astype(np.float64) * step
    assert set(np.unique(q)) == {0.0, 1.0}
    assert abs(moved.mean() - 0.01 * step) < 5 * math.sqrt(0.01 * 0.99 / n) * step
    assert moved.var() <= step**2 / 4


def test_update_weights_saturates_and_scales() -> None:
    bits = 4
    lo, hi = weight_limits(bits)
    q = np.array([hi, lo, 0, 3], dtype=np.float32)
    update_weights(q, np.array([5.0, -5.0, 1.0, -1.0], dtype=np.float32), bits, np.random.default_rng(0), scale=0.25)
    assert q.tolist() == [hi, lo, 2.0, 1.0]  # +-0.25 real = +-2 steps of 1/8


def test_update_weights_on_the_sign_grid_is_unbiased() -> None:
    n = 200_000
    q = np.ones(n, dtype=np.float32)
    update_weights(q, np.full(n, -0.5, dtype=np.float32), 1, UniformPool(np.random.default_rng(5)))
    assert set(np.unique(q)) == {-1.0, 1.0}
    assert abs(q.mean() - 0.5) < 5 * math.sqrt(0.75 / n) * 2  # E = 1 - 0.5


def test_scale_exponent_is_the_smallest_that_fits() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([2.0 ** np.arange(-60, 60), rng.uniform(1e-9, 1e9, 2000)])
    values = np.concatenate([values, np.nextafter(values, 0), np.nextafter(values, np.inf)])
    for t in (0, 1, 3, 7, 15, 30):
        for v in values:
            e = scale_exponent(float(v), t)
            assert math.ldexp(v, -e) <= 2.0**t < math.ldexp(v, 1 - e), (v, t, e)
    assert scale_exponent(0.0, 7) == 0


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_requantize_refuses_non_finite_values(value: float) -> None:
    with pytest.raises(FloatingPointError, match="diverged"):
        requantize(np.array([1.0, value], dtype=np.float32), 0, 8)


@pytest.mark.parametrize("bits", range(1, 32))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_requantize_fits_the_format_and_rounds_within_one_step(bits: int, rounding: str) -> None:
    rng = np.random.default_rng(bits)
    pool = UniformPool(rng)
    for signed in (True, False):
        x = rng.normal(0, 10.0 ** rng.uniform(-5, 5), (40, 30))
        if not signed:
            x = np.abs(x)
        x = x.astype(np.float32)
        out = requantize(x, 3, bits, rounding, pool)
        t, limit = dynamic_format(bits, unsigned=not signed)
        assert out.bound == 2**t
        assert np.all(out.q == np.round(out.q))  # integers
        assert out.q.max() <= limit and out.q.min() >= (-(2**t) if signed else 0)
        real = out.q.astype(np.float64) * 2.0 ** out.exponent
        err = real - x.astype(np.float64) * 2.0**3
        step = 2.0 ** out.exponent
        assert np.abs(err).max() <= step * (0.5 if rounding == "nearest" else 1.0) + step  # + saturation of the top
        # the scale is the finest that fits: half of it would not
        assert np.abs(x).max() * 2.0**3 > 2.0 ** (t - 1 + out.exponent)


def test_requantize_is_exact_on_the_grid_and_uses_unsigned_for_nonnegative_tensors() -> None:
    q = np.array([[0, 1, 7, 15]], dtype=np.float32)  # 4-bit unsigned integers, largest 15 <= 2**4
    out = requantize(q * 2.0**-5, 0, 4)
    assert out.exponent == -5 and out.q.tolist() == q.tolist()
    signed = np.array([-8, -1, 0, 7], dtype=np.float32)
    out = requantize(signed * 0.25, 0, 4)
    assert out.exponent == -2 and out.q.tolist() == signed.tolist()


def test_requantize_saturates_only_the_top_half_step() -> None:
    # data in [0, 1]: 1.0 is scaled to 2**n and saturates to 2**n - 1, the rest keeps full resolution
    x = np.array([0.0, 0.25, 0.5, 0.96, 1.0])
    out = requantize(x, 0, 4)
    assert out.exponent == -4
    assert out.q.tolist() == [0, 4, 8, 15, 15]


def test_one_bit_activations_are_binary_and_one_bit_errors_use_two_bits() -> None:
    assert dynamic_format(1, unsigned=True) == (1, 1)
    assert dynamic_format(1, unsigned=False) == (1, 1)  # {-2, -1, 0, 1}
    out = requantize(np.array([0.0, 0.2, 0.9, 1.3]), 0, 1)
    assert set(out.q.tolist()) <= {0.0, 1.0}
    out = requantize(np.array([-1.0, 0.2, 0.9]), 0, 1)
    assert set(out.q.tolist()) <= {-2.0, -1.0, 0.0, 1.0}


def test_requantize_stochastic_is_unbiased() -> None:
    n = 1_000_000
    x = np.full(n, 0.3, dtype=np.float32)
    x[0] = 1.0  # sets the scale: 8 bits unsigned, exponent -8, so 0.3 -> 76.8 units
    out = requantize(x, 0, 8, "stochastic", UniformPool(np.random.default_rng(11)))
    units = out.q[1:].astype(np.float64)
    assert set(np.unique(units)) == {76.0, 77.0}
    expected = np.float64(np.float32(0.3)) * 256
    assert abs(units.mean() - expected) < 5 * math.sqrt(0.8 * 0.2 / n)


def test_requantize_handles_tiny_and_zero_tensors() -> None:
    tiny = np.array([1e-40, -3e-41, 0.0], dtype=np.float32)  # float32 subnormals
    out = requantize(tiny, 0, 8)
    np.testing.assert_allclose(out.q * 2.0**out.exponent, tiny.astype(np.float64), rtol=0.02, atol=0)
    zero = requantize(np.zeros(5, dtype=np.float32), 2, 8)
    assert zero.exponent == 2 and not zero.q.any()


def test_requantize_keeps_wide_integers_in_float64() -> None:
    x = np.arange(-1000, 1000, dtype=np.float32) * 1001.0
    out = requantize(x, 0, 20)
    assert out.q.dtype == np.float64
    np.testing.assert_array_equal(out.q, np.rint(x.astype(np.float64) * 2.0 ** -out.exponent))


def test_uniform_pool_draws_fresh_seeded_numbers() -> None:
    a, b = UniformPool(np.random.default_rng(9), block=1000), UniformPool(np.random.default_rng(9), block=1000)
    draws_a = [a.draw((3, 7)) for _ in range(200)]
    draws_b = [b.draw((3, 7)) for _ in range(200)]
    flat = np.concatenate([d.ravel() for d in draws_a])
    assert all(np.array_equal(x, y) for x, y in zip(draws_a, draws_b))  # same seed, same numbers
    assert ((flat > 0) & (flat < 1)).all()
    assert abs(flat.mean() - 0.5) < 5 * math.sqrt(1 / 12 / flat.size)
    assert a.draw((5000,)).shape == (5000,)  # larger than a block
    first = draws_a[0].copy()
    a.draw((900,))
    np.testing.assert_array_equal(draws_a[0], first)  # refills never overwrite numbers handed out


def test_dequantize() -> None:
    q = np.array([-128, 0, 127], dtype=np.float32)
    assert dequantize(q, -7).tolist() == [-1.0, 0.0, 127 / 128]
    assert dequantize(q, -7).dtype == np.float32


def test_requantize_refuses_nan_even_when_promised_nonnegative() -> None:
    from edge.fixedpoint import requantize

    x = np.array([0.5, np.nan, 2.0], dtype=np.float32)
    with pytest.raises(FloatingPointError):
        requantize(x, 0, bits=8, nonnegative=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_of_two_is_exact_inside_and_outside_the_normal_range(dtype) -> None:
    from edge.fixedpoint import power_of_two

    info = np.finfo(dtype)
    exponents = (info.minexp - 5, info.minexp, -24, -1, 0, 1, 30, info.maxexp - 1, info.maxexp + 3)
    for exponent in (e for e in exponents if e < 1024):  # 2.0**1024 is beyond any Python float
        value = power_of_two(exponent, np.dtype(dtype))
        assert float(value) == 2.0 ** exponent
        inside = info.minexp <= exponent < info.maxexp
        assert isinstance(value, np.ndarray) == inside
        if inside:
            assert value.dtype == dtype


def test_pure_numeric_modules_pass_their_doctests() -> None:
    import doctest

    import edge.fixedpoint
    import edge.gemm

    for module in (edge.fixedpoint, edge.gemm):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# -- per-layer weight range and asymmetric activations ----------------------------


def test_weight_range_is_the_smallest_power_of_two_above_two_he_deviations() -> None:
    for fan_in in range(1, 5000):
        k = weight_range_exponent(fan_in)
        target = 2.0 * math.sqrt(2.0 / fan_in)
        assert k <= 0 and isinstance(k, int)
        assert 2.0**k >= min(target, 1.0) - 1e-12 and (k == 0 or 2.0 ** (k - 1) < target), fan_in
    assert weight_range_exponent(32) == -1  # 2 * sqrt(2/32) = 1/2 exactly: no rounding up
    with pytest.raises(ValueError, match="fan_in"):
        weight_range_exponent(0)


def test_network_exponents_describe_the_grid_integers() -> None:
    from edge.network import Network
    from models import get_architecture

    for bits in (1, 2, 4, 8, 12):
        net = Network(get_architecture("cnn-mnist"), bits=bits, seed=0)
        values, ints = net.get_weights(), net.get_integers()
        lo, hi = weight_limits(bits)
        for name, e in net.exponents.items():
            np.testing.assert_array_equal(ints[name] * 2.0**e, values[name])
            assert ints[name].min() >= lo and ints[name].max() <= hi
        # conv 1 (fan-in 9): range 1; conv 2 (72): 1/2; dense (784): 1/8
        assert [net.exponents[n] for n in ("0.weight", "3.weight", "7.weight")] == [
            weight_exponent(bits, k) for k in (0, -1, -3)]
    assert Network(get_architecture("mlp"), bits=32).exponents == {}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_asymmetric_activations_use_all_codes_and_round_to_nearest(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for _ in range(200):
        x = rng.normal(size=50) * rng.uniform(0.01, 100)
        x = np.maximum(x, x * 0.125)  # a leaky ReLU output
        if x.min() >= 0:
            continue
        f = requantize(x, 0, bits, asymmetric=True)
        shift, lo, hi = asymmetric_range(float(x.max()), float(x.min()), bits)
        assert f.exponent == shift and hi - lo == 2**bits - 1 and lo <= 0 <= hi
        assert f.q.min() >= lo and f.q.max() <= hi and f.bound == max(-lo, hi)
        step = 2.0**f.exponent
        err = np.abs(f.q * step - x)
        assert err.max() <= step * (0.5 + 1e-9) + (step if bits == 1 else 0.0)
        if bits > 1:  # never coarser than the signed grid of the same bits (that one has 2 bits at n = 1)
            assert f.exponent <= requantize(x, 0, bits).exponent


def test_asymmetric_requantize_reports_divergence() -> None:
    with pytest.raises(FloatingPointError, match="diverged"):
        requantize(np.array([-1.0, np.inf]), 0, 4, asymmetric=True)
