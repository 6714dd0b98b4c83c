"""Learning curves from a real SQLite store: which earlier experiments lend one, and what it holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from basestation.energy.empirical import save_curves
from basestation.energy.store_history import curves_from_store, is_store_file, resolve_history
from basestation.store import Store

T0 = 1_000_000.0
TRAINING = {"lr": 0.2, "batch_size": 32, "momentum": 0.0, "mode": "int", "strategy": "fedavg",
            "uplink_scheme": "scaled", "iterations": 20}


def config(**changes) -> dict:
    doc = {"model": "mlp", "dataset": "digits", "dataset_seed": 0, "seed": 3, "training": dict(TRAINING),
           "round": {"devices_per_round": 0}}
    for key, value in changes.items():
        if key in TRAINING:
            doc["training"][key] = value
        else:
            doc[key] = value
    return doc


def add_experiment(store: Store, name: str, settings: list[tuple[int, int, int]], accuracy: list[float],
                   cfg: dict | None = None, *, abandon: tuple[int, ...] = ()) -> None:
    """Rounds at the given (n, m, I), two devices, each phase's energy a known function of round and device."""
    store.create_experiment(name, cfg or config(), now=T0)
    t = T0
    for r, ((n, m, iters), acc) in enumerate(zip(settings, accuracy), start=1):
        plan = {"experiment": name, "round": r, "n": n, "m": m, "iterations": iters}
        store.open_round(name, r, selected=["pi-0", "pi-1"], n=n, m=m, deadline=t + 60, quorum=2,
                         model_hash=f"h{r}", plan=plan, now=t)
        for k, device in enumerate(("pi-0", "pi-1")):
            phases = {phase: {"joules": base + r + k, "joules_above_idle": 0.1 * (base + r + k), "seconds": 1.0,
                              "samples": 10, "partial": False, "gap_seconds": 0.0, "uncertainty_j": 0.0}
                      for phase, base in (("train", 1.0), ("uplink", 2.0), ("idle", 5.0))}
            store.add_energy_report(name, device, r, f"{name}-{device}-{r}", {"meter": {"phases": phases}}, now=t)
        if r in abandon:
            store.close_round(name, r, "abandoned", now=t + 1)
        else:
            store.close_round(name, r, "aggregated", result_hash=f"h{r + 1}", now=t + 1)
            store.add_evaluation(name, r, loss=1.0, accuracy=acc, samples=100, model_hash=f"h{r + 1}", now=t + 1)
        t += 10


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "base.sqlite") as db:
        add_experiment(db, "fixed-8", [(8, 8, 20)] * 3, [0.5, 0.8, 0.93])
        add_experiment(db, "fixed-16", [(16, 4, 5)] * 4, [0.4, 0.6, 0.85, 0.91], abandon=(2,))
        add_experiment(db, "adaptive", [(8, 8, 20), (16, 16, 20)], [0.5, 0.9])
        add_experiment(db, "cnn", [(8, 8, 20)] * 2, [0.5, 0.9], config(model="cnn"))
        add_experiment(db, "faster", [(8, 8, 20)] * 2, [0.5, 0.9], config(lr=0.3))
        add_experiment(db, "mnist", [(8, 8, 20)] * 2, [0.5, 0.9], config(dataset="mnist-subset"))
        add_experiment(db, "current", [(32, 32, 20)], [0.5])
        yield db


def test_only_fixed_runs_of_the_same_training_give_curves(store: Store) -> None:
    curves, skipped = curves_from_store(store, like=config(), exclude={"current"})
    assert sorted(c.setting for c in curves) == [(8, 8, 20), (16, 4, 5)]
    assert skipped == {"adaptive": "its rounds ran 2 settings, not one",
                       "cnn": "model 'cnn', not 'mlp'",
                       "faster": "training lr 0.3, not 0.2",
                       "mnist": "dataset 'mnist-subset', not 'digits'"}
    assert "current" not in skipped


def test_a_curve_holds_the_aggregated_rounds_and_their_energy(store: Store) -> None:
    curves, _ = curves_from_store(store, like=config(), exclude={"current"})
    by_setting = {c.setting: c for c in curves}
    eight = by_setting[(8, 8, 20)]
    assert eight.seed == 3 and eight.accuracy == (0.5, 0.8, 0.93) and eight.rounds_to(0.9) == 3
    # every phase of both devices (idle included) in energy_j; above idle of train and uplink apart
    for r, (energy, train, uplink) in enumerate(zip(eight.energy_j, eight.train_j, eight.uplink_j), start=1):
        assert energy == pytest.approx(sum(base + r + k for base in (1.0, 2.0, 5.0) for k in (0, 1)))
        assert train == pytest.approx(0.1 * ((1 + r) + (2 + r)))
        assert uplink == pytest.approx(0.1 * ((2 + r) + (3 + r)))
    sixteen = by_setting[(16, 4, 5)]
    assert sixteen.accuracy == (0.4, 0.85, 0.91)  # the abandoned round 2 produced no model: left out
    assert len(sixteen.energy_j) == 3 and sixteen.rounds_to(0.9) == 3


def test_resolve_history_reads_the_own_store_another_store_or_json(store: Store, tmp_path: Path) -> None:
    own, _ = resolve_history("store", own_store=store, like=config(), experiment="current")
    other, _ = resolve_history(tmp_path / "base.sqlite", own_store=None, like=config(), experiment="current")
    assert sorted(c.setting for c in own) == sorted(c.setting for c in other) == [(8, 8, 20), (16, 4, 5)]
    save_curves(tmp_path / "curves.json", own)
    from_json, skipped = resolve_history(tmp_path / "curves.json", own_store=None, like=config(), experiment="x")
    assert from_json == own and skipped == {}
    assert is_store_file(tmp_path / "base.sqlite") and not is_store_file(tmp_path / "curves.json")
    (tmp_path / "junk.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"\[precision\] history: .*junk.json is not JSON.*a store file"):
        resolve_history(tmp_path / "junk.json", own_store=None, like=config(), experiment="x")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_history(tmp_path / "missing.sqlite", own_store=None, like=config(), experiment="x")


@pytest.mark.slow
def test_a_testbed_run_takes_its_history_from_an_earlier_runs_store(tmp_path: Path) -> None:
    """End to end: a fixed run of 6 rounds, then a measured run whose --history is the first run's store file."""
    qfl = [sys.executable, "-m", "edge.cli", "testbed", "--devices", "2", "--out", str(tmp_path)]
    first = subprocess.run(qfl + ["--name", "fixed", "--rounds", "6", "--policy", "fixed", "--bits", "16",
                                  "--uplink-bits", "8"], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    history = tmp_path / "fixed" / "store.sqlite"
    second = subprocess.run(qfl + ["--name", "measured", "--rounds", "2", "--policy", "measured",
                                   "--history", str(history)], capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    with Store(tmp_path / "measured" / "store.sqlite", readonly=True) as db:
        decisions = db.decisions("measured")
        like = db.experiment("measured").config
    with Store(history, readonly=True) as old:
        curves, _ = curves_from_store(old, like=like)
    assert len(curves) == 1 and curves[0].setting == (16, 8, 20) and curves[0].rounds_to(0.9) is not None
    # The one setting the history knows reaches the target, so the policy adopts it (not its own 8/8) and holds it.
    assert [(d.n, d.m, d.inputs["history_curves"]) for d in decisions] == [(16, 8, 1), (16, 8, 1)]
    assert [d.detail["reason"] for d in decisions] == ["adopt the predicted optimum", "hold: still the optimum"]
