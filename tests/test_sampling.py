"""Client sampling: who trains in a round and the unbiased weights of their updates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basestation.strategies import (FedAvg, FixedSum, PartialSum, Selection, importance_probabilities,
                                    sample_devices)

DEVICES = [f"pi-{i:02d}" for i in range(10)]
SAMPLES = {d: 20 + 7 * i for i, d in enumerate(DEVICES)}  # unequal shards
VARIANCES = {d: 0.5 + i for i, d in enumerate(DEVICES)}


def _updates() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {d: {"w": rng.normal(size=4)} for d in DEVICES}


def _full_fedavg(updates: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    total = sum(SAMPLES.values())
    return sum(SAMPLES[d] / total * updates[d]["w"] for d in DEVICES)


def _aggregate(selection: Selection, updates: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    acc = selection.accumulator(FedAvg())
    for device in selection.selected:
        acc.add(updates[device], selection.weight(device, SAMPLES[device]))
    return acc.result()["w"].astype(np.float64)


@pytest.mark.parametrize("scheme", ["uniform", "importance"])
def test_sampled_aggregate_is_unbiased(scheme: str) -> None:
    updates = _updates()
    rounds = 6000
    mean = sum(_aggregate(sample_devices(scheme, DEVICES, 3, seed=1, round_=r, samples=SAMPLES,
                                         variances=VARIANCES), updates) for r in range(rounds)) / rounds
    target = _full_fedavg(updates)
    # The plain re-normalised mean of the sampled updates is biased towards small shards' directions only
    # slightly here; the unbiased estimator must agree with full participation to Monte-Carlo precision.
    assert np.allclose(mean, target, atol=0.03), (mean, target)


def test_uniform_everyone_is_plain_fedavg() -> None:
    updates = _updates()
    selection = sample_devices("uniform", DEVICES, 0, seed=0, round_=1, samples=SAMPLES)
    assert selection.selected == tuple(DEVICES) and not selection.unbiased
    assert isinstance(selection.accumulator(FedAvg()), PartialSum)
    assert not isinstance(selection.accumulator(FedAvg()), FixedSum)
    assert np.allclose(_aggregate(selection, updates), _full_fedavg(updates), atol=1e-6)


def test_importance_favours_low_variance_and_draws_with_replacement() -> None:
    q = importance_probabilities(DEVICES, VARIANCES)
    assert q["pi-00"] > q["pi-09"] and sum(q.values()) == pytest.approx(1.0)
    assert q["pi-00"] / q["pi-09"] == pytest.approx(VARIANCES["pi-09"] / VARIANCES["pi-00"])
    counts = {d: 0 for d in DEVICES}
    for r in range(2000):
        s = sample_devices("importance", DEVICES, 3, seed=0, round_=r, samples=SAMPLES, variances=VARIANCES)
        assert sum(s.draws.values()) == 3 and 1 <= len(s.selected) <= 3
        for d, n in s.draws.items():
            counts[d] += n
    assert counts["pi-00"] / 6000 == pytest.approx(q["pi-00"], abs=0.02)


def test_unknown_variance_gets_the_median_and_no_report_is_uniform() -> None:
    q = importance_probabilities(["a", "b", "c"], {"a": 1.0, "b": 3.0, "c": float("nan")})
    assert q["c"] == pytest.approx(q["a"] * 1.0 / 2.0)  # median of {1, 3} is 2
    assert importance_probabilities(["a", "b"], {}) == {"a": 0.5, "b": 0.5}


def test_sampling_is_seeded_and_round_dependent() -> None:
    a = sample_devices("uniform", DEVICES, 3, seed=4, round_=2)
    assert a == sample_devices("uniform", DEVICES, 3, seed=4, round_=2)
    assert len(a.selected) == 3
    assert {sample_devices("uniform", DEVICES, 3, seed=4, round_=r).selected for r in range(10)} != {a.selected}


def test_selection_round_trips_through_json() -> None:
    s = sample_devices("importance", DEVICES, 4, seed=0, round_=1, samples=SAMPLES, variances=VARIANCES)
    assert Selection.from_json(s.to_json()) == s


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sampling scheme"):
        sample_devices("roulette", DEVICES, 2, seed=0, round_=1)


@pytest.mark.parametrize("args, message", [
    (["--devices", "4", "--per-round", "5"], "--per-round must be 1..4"),
    (["--devices", "4", "--per-round", "0"], "--per-round must be 1..4"),
    (["--devices", "4", "--per-round", "2", "--sampling", "roulette"], "--sampling must be one of"),
    (["--devices", "2", "--dataset", "mnist:/nonexistent/dir"], "not a directory of MNIST-format IDX files"),
    (["--devices", "2", "--momentum", "-0.1"], "--momentum must be in [0, 0.999], got -0.1"),
])
def test_testbed_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "testbed", *args, "--out", str(tmp_path), "--name", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written for a run that cannot start
