"""The network's weights API, the local trainer, its statistics, and the accuracy it reaches on digits."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edge.data import load_dataset
from edge.fixedpoint import weight_limits, weight_step
from edge.network import Network
from edge.trainer import LocalTrainer, TrainResult, evaluate
from models import get_architecture

EPOCH = 1348 // 32  # iterations per epoch on the digits training split (1348 examples)


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_dataset("digits", seed=0)


def test_edge_imports_stay_light() -> None:
    code = (
        "import sys, json\n"
        "import edge\n"
        "import edge.network, edge.trainer, edge.fixedpoint, edge.gemm, edge.layers\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'matplotlib', 'basestation', 'scipy')]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# -- the network's weights -------------------------------------------------------


def test_weights_are_named_shaped_and_on_the_grid() -> None:
    net = Network(get_architecture("cnn"), bits=6, seed=1)
    weights = net.get_weights()
    assert list(weights) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    assert weights["0.weight"].shape == (8, 1, 3, 3) and weights["7.weight"].shape == (64, 10)
    assert net.exponents == {"0.weight": -5, "0.bias": -5, "3.weight": -6, "3.bias": -6, "7.weight": -6, "7.bias": -6}
    for name, value in weights.items():
        assert value.dtype == np.float32
        q = value * 2.0 ** -net.exponents[name]  # ranges 1, 1/2, 1/2 for fan-ins 9, 72, 64
        np.testing.assert_array_equal(q, np.round(q))
        assert q.min() >= weight_limits(6)[0] and q.max() <= weight_limits(6)[1]
    weights["0.weight"][...] = 0.5  # a copy: the network does not change
    assert not np.all(net.get_weights()["0.weight"] == 0.5)


def test_set_weights_rounds_to_nearest_and_saturates() -> None:
    net = Network(get_architecture("mlp"), bits=4, seed=0)
    weights = net.get_weights()
    weights["0.weight"][0, :4] = [0.15, -0.15, 7.0, 0.0312]  # range 1/2, step 1/16
    net.set_weights(weights)
    assert net.get_weights()["0.weight"][0, :4].tolist() == [0.125, -0.125, 0.4375, 0.0]
    np.testing.assert_array_equal(net.get_weights()["2.bias"], weights["2.bias"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("0.bias"), r"missing \['0.bias'\]"),
        (lambda w: w.update({"9.weight": np.zeros(3)}), r"unexpected \['9.weight'\]"),
        (lambda w: w.update({"0.weight": np.zeros((32, 64))}), r"'0.weight' must have shape \(64, 32\)"),
        (lambda w: w["2.bias"].__setitem__(0, np.nan), "non-finite"),
    ],
)
def test_set_weights_names_what_is_wrong(change, message: str) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=8)
    weights = net.get_weights()
    change(weights)
    with pytest.raises(ValueError, match=message):
        net.set_weights(weights)


def test_constructor_checks_its_arguments() -> None:
    arch = get_architecture("mlp")
    with pytest.raises(ValueError, match="bits must be a whole number from 1 to 32"):
        Network(arch, bits=0)
    with pytest.raises(ValueError, match="mode must be 'int' or 'master'"):
        Network(arch, mode="float")
    with pytest.raises(TypeError, match="models.Architecture"):
        Network("mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding"):
        Network(arch, error_rounding="down")  # type: ignore[arg-type]


def test_set_bits_requantizes() -> None:
    net = Network(get_architecture("mlp"), bits=8, seed=2)
    w8 = net.get_weights()
    net.set_bits(4)
    w4 = net.get_weights()
    for name in w8:
        step = 2.0 ** net.exponents[name]
        expected = np.clip(np.rint(w8[name].astype(np.float64) / step), -8, 7) * step
        np.testing.assert_array_equal(w4[name], expected)
    net.set_bits(8)  # the 4-bit grid is part of the 8-bit grid: nothing changes
    assert all(np.array_equal(net.get_weights()[n], w4[n]) for n in w4)
    net.set_bits(32)
    assert net.bits == 32 and all(np.array_equal(net.get_weights()[n], w4[n]) for n in w4)


def test_predict_accepts_flat_or_shaped_inputs_and_names_a_bad_shape(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("cnn"), bits=8)
    flat = net.predict(digits.x_test[:5])
    shaped = net.predict(digits.x_test[:5].reshape(5, 1, 8, 8))
    np.testing.assert_array_equal(flat, shaped)
    assert flat.shape == (5, 10)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 1, 8, 8\) or \(N, 64\), got \(5, 63\)"):
        net.predict(np.zeros((5, 63)))


def test_predict_in_chunks_is_the_same_as_at_once(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=8, seed=4)
    np.testing.assert_array_equal(net.predict(digits.x_test, batch_size=50), net.predict(digits.x_test))


# -- training ----------------------------------------------------------------------


def test_int_mode_delta_is_exact_and_on_the_grid(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=6, seed=0)
    before = net.get_weights()
    res = LocalTrainer(lr=0.3, seed=0).train(net, digits.x_train, digits.y_train, iterations=30)
    after = net.get_weights()
    assert isinstance(res, TrainResult)
    assert res.iterations == 30 and res.samples == len(digits.y_train) and res.batch_size == 32
    for name in before:
        assert res.delta[name].dtype == np.float32
        np.testing.assert_array_equal(res.delta[name], after[name] - before[name])
        steps = res.delta[name] * 2.0 ** -net.exponents[name]
        np.testing.assert_array_equal(steps, np.round(steps))
    assert any(np.any(d != 0) for d in res.delta.values())


def test_master_mode_keeps_a_float_copy_and_reports_its_change(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=4, mode="master", seed=0)
    before = net.get_weights()
    res = LocalTrainer(lr=0.1, seed=0).train(net, digits.x_train, digits.y_train, iterations=5)
    after = net.get_weights()
    for name in before:
        np.testing.assert_allclose(res.delta[name], after[name] - before[name], atol=1e-7)
    grid = net.get_weights(quantized=True)
    for name, value in grid.items():
        step = 2.0 ** net.exponents[name]
        np.testing.assert_array_equal(value, np.clip(np.rint(after[name] / step), -8, 7) * step)
    small = [d for d in res.delta.values() if np.any((d != 0) & (np.abs(d) < weight_step(4) / 2))]
    assert small  # updates below half a step survive in the master copy


def test_training_is_reproducible_from_the_seeds(digits) -> None:  # type: ignore[no-untyped-def]
    def run(seed: int) -> dict[str, np.ndarray]:
        net = Network(get_architecture("cnn"), bits=4, seed=seed)
        return LocalTrainer(lr=0.1, seed=seed).train(net, digits.x_train, digits.y_train, iterations=10).delta

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not all(np.array_equal(a[n], c[n]) for n in a)


def test_successive_calls_continue_the_batches_and_momentum(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=32, seed=0)
    trainer = LocalTrainer(lr=0.05, momentum=0.9, seed=0)
    first = trainer.train(net, digits.x_train, digits.y_train, iterations=EPOCH)
    second = trainer.train(net, digits.x_train, digits.y_train, iterations=EPOCH)
    assert second.loss < first.loss
    assert evaluate(net, digits.x_test, digits.y_test)[1] > 0.85


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_very_low_precision_trains_without_failing(digits, bits: int) -> None:  # type: ignore[no-untyped-def]
    for name in ("mlp", "cnn"):
        net = Network(get_architecture(name), bits=bits, seed=0)
        res = LocalTrainer(lr=0.1, seed=0).train(net, digits.x_train, digits.y_train, iterations=40)
        assert math.isfinite(res.loss) and math.isfinite(res.grad_sq_norm)
        loss, accuracy = evaluate(net, digits.x_test, digits.y_test)
        assert math.isfinite(loss) and 0.0 <= accuracy <= 1.0
        if bits == 1:
            weights = net.get_weights()
            assert all(set(np.unique(weights[n] * 2.0 ** -e)) <= {-1.0, 1.0} for n, e in net.exponents.items())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that is being reported
def test_float32_divergence_is_reported(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=32, seed=0)
    with pytest.raises(FloatingPointError, match="diverged"):
        LocalTrainer(lr=1e30, seed=0).train(net, digits.x_train, digits.y_train, iterations=20)


def test_statistics_estimate_the_minibatch_gradient_variance(digits) -> None:  # type: ignore[no-untyped-def]
    """At fixed weights, the half-batch estimate matches brute force over many fresh minibatches."""
    net = Network(get_architecture("mlp"), bits=32, seed=0, float_dtype=np.float64)
    LocalTrainer(lr=0.3, seed=1).train(net, digits.x_train, digits.y_train, iterations=EPOCH)  # away from the start
    x, y = net.as_batch(digits.x_train), digits.y_train
    net.backprop(x, y)
    full = net.grad.copy()
    rng = np.random.default_rng(2)
    squared = []
    for _ in range(1500):
        index = rng.choice(len(y), 32, replace=False)
        net.backprop(x[index], y[index])
        squared.append(float(np.sum((net.grad - full) ** 2)))
    brute = float(np.mean(squared))
    trainer = LocalTrainer(lr=1e-300, seed=3, variance_every=1)  # lr too small to move float64 weights
    res = trainer.train(net, x, y, iterations=1500)
    assert res.grad_variance == pytest.approx(brute, rel=0.1)
    sparse = LocalTrainer(lr=1e-300, seed=3).train(net, x, y, iterations=1500)  # every 4th iteration
    assert sparse.grad_variance == pytest.approx(brute, rel=0.15)
    assert res.grad_sq_norm == pytest.approx(brute + float(full @ full), rel=0.1)
    assert res.loss > 0


def test_variance_with_batches_of_one_is_not_estimable(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=8)
    res = LocalTrainer(batch_size=1).train(net, digits.x_train[:10], digits.y_train[:10], iterations=3)
    assert math.isnan(res.grad_variance) and res.batch_size == 1


def test_batches_larger_than_the_shard_use_the_whole_shard(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=8)
    res = LocalTrainer(batch_size=64).train(net, digits.x_train[:20], digits.y_train[:20], iterations=2)
    assert res.batch_size == 20 and res.samples == 20 and not math.isnan(res.grad_variance)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0), "lr must be a positive number"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(variance_every=0), "variance_every must be a positive integer"),
    ],
)
def test_trainer_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalTrainer(**kwargs)


@pytest.mark.parametrize(
    "x, y, iterations, error, message",
    [
        (np.zeros((4, 64)), np.zeros(3, np.int64), 1, ValueError, "one integer per input: 4 inputs"),
        (np.zeros((4, 64)), np.array([0, 1, 2, 10]), 1, ValueError, r"labels must be in 0..9"),
        (np.zeros((4, 64)), np.zeros(4), 1, TypeError, "labels must be integers"),
        (np.zeros((4, 60)), np.zeros(4, np.int64), 1, ValueError, r"expects inputs of shape \(N, 64\)"),
        (np.full((4, 64), np.nan), np.zeros(4, np.int64), 1, ValueError, "non-finite"),
        (np.zeros((0, 64)), np.zeros(0, np.int64), 1, ValueError, "no training data"),
        (np.zeros((4, 64)), np.zeros(4, np.int64), 0, ValueError, "iterations must be a positive integer"),
    ],
)
def test_training_data_is_checked(x: np.ndarray, y: np.ndarray, iterations: int, error: type, message: str) -> None:
    net = Network(get_architecture("mlp"), bits=8)
    with pytest.raises(error, match=message):
        LocalTrainer().train(net, x, y, iterations=iterations)


def test_evaluate(digits) -> None:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=8, seed=0)
    loss, accuracy = evaluate(net, digits.x_test, digits.y_test)
    assert loss > 1.0 and accuracy < 0.5  # untrained
    LocalTrainer(lr=0.3, seed=0).train(net, digits.x_train, digits.y_train, iterations=5 * EPOCH)
    loss, accuracy = evaluate(net, digits.x_test, digits.y_test)
    assert loss < 0.5 and accuracy > 0.9


# -- the accuracy the engine reaches -------------------------------------------------


@pytest.mark.parametrize("bits, target", [(32, 0.96), (8, 0.95), (4, 0.90)])
def test_digits_mlp_accuracy_over_three_seeds(digits, bits: int, target: float) -> None:  # type: ignore[no-untyped-def]
    accuracies = []
    for seed in range(3):
        net = Network(get_architecture("mlp"), bits=bits, seed=seed)  # default mode: int
        LocalTrainer(lr=0.3, seed=seed).train(net, digits.x_train, digits.y_train, iterations=20 * EPOCH)
        accuracies.append(evaluate(net, digits.x_test, digits.y_test)[1])
    assert float(np.mean(accuracies)) >= target, accuracies


@pytest.mark.parametrize("bits", [2, 8, 12])
def test_step_is_update_weights_with_cached_constants(bits: int) -> None:
    """Network.step keeps its factor and grid limits between steps; it must add exactly what update_weights adds,
    also when the learning rate changes and when the update drives weights past both ends of the grid."""
    from edge.fixedpoint import UniformPool, update_weights

    net = Network(get_architecture("mlp"), bits=bits, seed=3)
    reference = net._q.copy()
    pool = UniformPool(np.random.default_rng(11))
    net._uniform = pool  # the step draws from this pool; the reference from a twin in the same state
    twin = UniformPool(np.random.default_rng(11))
    rng = np.random.default_rng(2)
    lo, hi = weight_limits(bits)
    for scale in (-0.1, -0.1, -0.03, -50.0, 50.0):
        update = rng.normal(size=net.size).astype(net.grad.dtype)
        net.step(update, scale)
        update_weights(reference, update, bits, twin, (net._inv_range * scale).astype(reference.dtype))
        np.testing.assert_array_equal(net._q, reference)
    assert net._q.min() == lo and net._q.max() == hi  # the large steps saturated both ends


def test_flat_step_bench_trains_like_the_engine(digits) -> None:  # type: ignore[no-untyped-def]
    """bench/step_floor.py's flat steps stay the engine's computation (it checks each step before timing)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "step_floor.py"
    spec = importlib.util.spec_from_file_location("step_floor", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    batches = [np.random.default_rng(i).choice(len(digits.y_train), bench.BATCH, replace=False) for i in range(6)]
    runs = bench.steppers(digits.x_train, digits.y_train, batches)  # raises if any step differs
    assert sorted(runs) == ["engine/8", "engine/float32", "flat/8", "flat/float32"]
