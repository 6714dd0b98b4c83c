"""Bounds on what a device may claim, and the screened aggregate (basestation.bounds, basestation.screening)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from basestation.bounds import BoundSettings, UpdateBounds, check_samples
from basestation.screening import Entry, aggregate_screened
from basestation.store import Store
from basestation.strategies import get_strategy


def test_default_bound_follows_the_weight_grid_and_the_round_precision() -> None:
    assert UpdateBounds.for_round(8).max_abs == 4.0
    assert UpdateBounds.for_round(1).max_abs == 4.0
    assert UpdateBounds.for_round(32).max_abs == 16.0
    assert UpdateBounds.for_round(8, BoundSettings(max_update_abs=0.5)).max_abs == 0.5
    assert UpdateBounds.for_round(32, BoundSettings(float_update_abs=3.0)).max_abs == 3.0


def test_values_and_samples_beyond_the_bounds_are_named() -> None:
    bounds = UpdateBounds(4.0)
    assert bounds.check({"w": np.full(3, 4.0, np.float32)}, 10, 10) is None
    assert "'w'" in bounds.check({"w": np.array([0.0, -4.5], np.float32)}, 10, 10)
    assert "non-finite" in bounds.check({"w": np.array([np.inf], np.float32)}, 10, 10)
    assert "1.70141e+38" in bounds.check({"w": np.array([2.0**127], np.float32)}, 10, None)
    assert "shard size 50" in check_samples(2**32 - 1, 50)
    assert check_samples(0, None) == "samples 0 < 1"
    assert check_samples(10**9, None) is None  # no declaration: any positive count


def entries() -> list[Entry]:
    rng = np.random.default_rng(0)
    honest = [Entry(f"n{i}", f"d{i}", {"w": rng.normal(0, 0.01, 8).astype(np.float32)}, 50) for i in range(3)]
    # Within a lax bound on its own, but it drags the model into NaN land (the evaluate below says so).
    bad = Entry("bad", "evil", {"w": np.full(8, 3.0e38, np.float32)}, 2**32 - 1)
    return [honest[0], bad, honest[1], honest[2]]


def evaluate(delta):
    weights = {"w": (np.ones(8, np.float32) + delta["w"]).astype(np.float32)}
    loss = float(np.mean(weights["w"].astype(np.float64) ** 2) * 1e300)  # inf for the poisoned aggregate
    return weights, loss, 0.5


@pytest.mark.parametrize("strategy", ["fedavg", "median", "trimmed_mean:0.25"])
def test_the_update_that_poisons_the_aggregate_is_dropped_and_the_rest_aggregated(strategy: str) -> None:
    screened = aggregate_screened(get_strategy(strategy).accumulator, entries(), evaluate, UpdateBounds(1e39))
    if strategy == "fedavg":
        assert [(e.device, "dropped from the aggregate" in r) for e, r in screened.dropped] == [("evil", True)]
        assert "not finite" in screened.dropped[0][1]
    else:  # the robust rules never let one update reach the result
        assert screened.dropped == []
    assert math.isfinite(screened.loss) and np.all(np.abs(screened.delta["w"]) < 0.1)
    assert "evil" not in {e.device for e in screened.kept} or strategy != "fedavg"


def test_nothing_acceptable_leaves_no_result() -> None:
    only_bad = [entries()[1]]
    screened = aggregate_screened(get_strategy("fedavg").accumulator, only_bad, evaluate, UpdateBounds(4.0))
    assert screened.delta is None and screened.kept == [] and len(screened.dropped) == 1
    assert "bound is 4" in screened.dropped[0][1]


def test_a_dropped_update_leaves_the_round_but_stays_a_known_nonce(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        store.create_experiment("e", {})
        store.open_round("e", 1, selected=["a"], n=8, m=8, deadline=1.0, quorum=1, model_hash="00", plan={})
        assert store.add_update("e", device="a", round_=1, nonce="aa", digest="d", samples=5, size=3, m=8,
                                payload=b"xyz")
        assert store.drop_update("e", "aa") and not store.drop_update("e", "aa")
        assert store.round("e", 1).accepted == 0
        assert store.update_payloads("e", 1) == []
        assert store.find_update("e", nonce="aa").status == "dropped"
        assert not store.add_update("e", device="a", round_=1, nonce="aa", digest="d", samples=5, size=3, m=8,
                                    payload=b"xyz")


def test_the_first_declared_shard_size_stays(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        store.create_experiment("e", {})
        store.register_device("e", "a", {"dataset_size": 50})
        store.register_device("e", "a", {"dataset_size": 10**9})
        assert store.devices("e")[0].dataset_size == 50


def report(**phase) -> dict:
    figures = {"joules": 10.0, "joules_above_idle": 4.0, "seconds": 3.0, **phase}
    return {"started_at": 1000.0, "sent_at": 1004.0, "meter": {"board": "pi4", "phases": {"train": figures}}}


def test_energy_reports_hold_to_the_board_supply_and_the_round() -> None:
    from basestation.bounds import EnergyLimits, check_energy_report

    pi4 = EnergyLimits.for_board("pi4")
    assert pi4.max_watts == pytest.approx(15.3)  # 5.1 V x 3.0 A
    assert EnergyLimits.for_board("nonesuch").max_watts == pytest.approx(25.5)  # the largest known: the Pi 5's
    assert check_energy_report(report(), pi4, opened_at=999.0, now=1005.0) is None
    assert "impossible" in check_energy_report(report(joules=1e300), pi4, 999.0, 1005.0)
    assert "impossible" in check_energy_report(report(joules_above_idle=-1e9), pi4, 999.0, 1005.0)
    assert "impossible" in check_energy_report(report(joules=70.0, seconds=3.0), pi4, 999.0, 1005.0)
    assert "lasts" in check_energy_report(report(seconds=1e6), pi4, 999.0, 1005.0)
    early = dict(report(), started_at=100.0)
    assert "outside the round" in check_energy_report(early, pi4, 999.0, 1005.0)
    assert "before started_at" in check_energy_report(dict(report(), sent_at=999.5), pi4, 999.0, 1005.0)
    assert check_energy_report({"meter": None}, pi4, 999.0, 1005.0) is None


def test_one_wild_device_does_not_move_the_loss_curve() -> None:
    from basestation.energy.convergence import loss_curve
    from basestation.energy.records import RoundStats

    def stats(wild: float | None) -> list[RoundStats]:
        rng = np.random.default_rng(3)
        out = []
        for r in range(1, 6):
            for d in range(4):
                loss = 2.0 / r + rng.normal(0, 0.01)
                if wild is not None and (r, d) == (3, 2):
                    loss = wild
                out.append(RoundStats(device=f"d{d}", round=r, loss=loss, grad_sq_norm=1.0 + 0.1 * d,
                                      grad_variance=0.5, samples=50, local_iters=10, n=8, lr=0.1))
        return out

    clean, dirty = loss_curve(stats(None)), loss_curve(stats(1e300))
    assert np.all(np.isfinite(dirty.loss))
    np.testing.assert_allclose(dirty.loss, clean.loss, rtol=0.02)
