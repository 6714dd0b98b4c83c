"""Aggregation strategies against direct float64 computations, plus their error cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from basestation.strategies import (AggregationError, FedAvg, Median, PartialSum, TrimmedMean, check_update,
                                    get_strategy)


def results(seed: int, count: int = 5) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [({"0.weight": rng.normal(size=(4, 3)).astype(np.float32), "0.bias": rng.normal(size=3).astype(np.float32)},
             int(rng.integers(1, 100))) for _ in range(count)]


def test_fedavg_is_the_sample_weighted_mean() -> None:
    res = results(0)
    out = FedAvg().aggregate(1, res)
    weights = np.array([w for _, w in res], dtype=np.float64)
    for name in ("0.weight", "0.bias"):
        stack = np.stack([v[name].astype(np.float64) for v, _ in res])
        expected = np.tensordot(weights, stack, axes=1) / weights.sum()
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)
        assert out[name].dtype == np.float32
    assert list(out) == ["0.weight", "0.bias"]


def test_fedavg_of_equal_updates_is_that_update() -> None:
    update = {"w": np.array([0.5, -0.25], dtype=np.float32)}
    out = FedAvg().aggregate(1, [(update, 3), (update, 7)])
    np.testing.assert_array_equal(out["w"], update["w"])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), count=st.integers(2, 12), split=st.integers(1, 11))
def test_partial_sums_combine_to_the_same_result(seed: int, count: int, split: int) -> None:
    res = results(seed, count)
    split = min(split, count - 1)
    left, right = PartialSum(), PartialSum()
    for values, weight in res[:split]:
        left.add(values, weight)
    for values, weight in res[split:]:
        right.add(values, weight)
    whole = FedAvg().aggregate(1, res)
    for combined in (left.combine(right), right.combine(left)):
        assert combined.count == count
        for name in whole:
            np.testing.assert_allclose(combined.result()[name], whole[name], rtol=1e-5, atol=1e-7)
    assert PartialSum().combine(left).result()["0.bias"].tolist() == left.result()["0.bias"].tolist()


def test_median_and_trimmed_mean_resist_one_outlier() -> None:
    honest = [({"w": np.array([1.0, 2.0])}, 1) for _ in range(4)]
    attack = [({"w": np.array([1e6, -1e6])}, 1000)]
    np.testing.assert_allclose(Median().aggregate(1, honest + attack)["w"], [1.0, 2.0])
    np.testing.assert_allclose(TrimmedMean(0.2).aggregate(1, honest + attack)["w"], [1.0, 2.0])
    assert abs(FedAvg().aggregate(1, honest + attack)["w"][0]) > 1e5  # the mean does not resist


def test_median_and_trimmed_mean_match_numpy() -> None:
    res = results(3, 7)
    stack = np.stack([v["0.weight"].astype(np.float64) for v, _ in res])
    np.testing.assert_allclose(Median().aggregate(1, res)["0.weight"], np.median(stack, axis=0), rtol=1e-6)
    k = 1  # floor(0.2 * 7)
    expected = np.sort(stack, axis=0)[k:7 - k].mean(axis=0)
    np.testing.assert_allclose(TrimmedMean(0.2).aggregate(1, res)["0.weight"], expected, rtol=1e-6)
    np.testing.assert_allclose(TrimmedMean(0.0).aggregate(1, res)["0.weight"], stack.mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("spec", ["fedavg", "median", "trimmed_mean:0.2"])
def test_accumulator_equals_aggregate(spec: str) -> None:
    strategy = get_strategy(spec)
    res = results(5, 6)
    acc = strategy.accumulator()
    for values, weight in res:
        acc.add(values, weight)
    assert acc.count == 6
    for name, value in strategy.aggregate(1, res).items():
        np.testing.assert_allclose(acc.result()[name], value, rtol=1e-6)


def test_get_strategy_names_and_errors() -> None:
    assert isinstance(get_strategy("fedavg"), FedAvg)
    assert get_strategy("trimmed_mean").beta == 0.1
    with pytest.raises(ValueError, match="unknown strategy 'krum'"):
        get_strategy("krum")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        get_strategy("trimmed_mean:0.5")
    with pytest.raises(ValueError, match="bad strategy"):
        get_strategy("trimmed_mean:half")


@pytest.mark.parametrize("strategy", [FedAvg(), Median(), TrimmedMean()])
def test_bad_results_are_refused(strategy) -> None:
    good = {"w": np.zeros(3, np.float32)}
    with pytest.raises(AggregationError, match="no results"):
        strategy.aggregate(1, [])
    with pytest.raises(AggregationError, match="shape"):
        strategy.aggregate(1, [(good, 1), ({"w": np.zeros(4, np.float32)}, 1)])
    with pytest.raises(AggregationError, match="missing"):
        strategy.aggregate(1, [(good, 1), ({"v": np.zeros(3, np.float32)}, 1)])
    with pytest.raises(AggregationError, match="weight"):
        strategy.aggregate(1, [(good, 0)])
    with pytest.raises(AggregationError, match="non-finite"):
        strategy.aggregate(1, [(good, 1), ({"w": np.array([0, np.nan, 0], np.float32)}, 1)])


def test_check_update() -> None:
    ref = {"a": np.zeros((2, 2)), "b": np.zeros(2)}
    check_update({"a": np.ones((2, 2)), "b": np.ones(2)}, ref)
    with pytest.raises(AggregationError, match="unexpected \\['c'\\]"):
        check_update({"a": np.ones((2, 2)), "b": np.ones(2), "c": np.ones(1)}, ref)
    with pytest.raises(AggregationError, match="non-finite"):
        check_update({"a": np.full((2, 2), np.inf), "b": np.ones(2)}, ref)
