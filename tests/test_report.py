"""The measured-versus-modelled report: metrics, CSV, figures and the self-contained HTML."""

from __future__ import annotations

import base64
import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

from basestation.report import EnergyRecord, ReportError, RoundRecord, RunData, write_report
from basestation.report import metrics
from basestation.report.tables import format_joules

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(name: str, seed: int, *, rounds: int = 10, devices: int = 3, bits: tuple[int, int] = (8, 8),
                  ground_truth: bool = True, model: bool = True) -> RunData:
    """A run that looks like a real one: accuracy rising, energy per device and phase, noisy predictions."""
    rng = np.random.default_rng(seed)
    round_records, energy = [], []
    for r in range(1, rounds + 1):
        n, m = (32, 32) if r <= 2 else bits
        accuracy = float(min(0.99, 1.0 - 0.9 * math.exp(-r / 3.0) + rng.normal(0, 0.01)))
        round_records.append(RoundRecord(r, accuracy, float(2.3 * math.exp(-r / 3.0)), n, m, devices, devices,
                                         float(2.0 + rng.random())))
        for d in range(devices):
            for phase, watts_s in (("train", 3.0 * n / 32), ("uplink", 0.4 * m / 32)):
                above = float(watts_s * (1.0 + 0.2 * rng.random()))
                joules = above + float(1.5 + 0.1 * rng.random())
                energy.append(EnergyRecord(
                    device=f"pi-{d}", round=r, phase=phase, joules=joules, joules_above_idle=above,
                    seconds=float(1.0 + rng.random()), samples=int(rng.integers(80, 120)),
                    partial=bool(rng.random() < 0.05),
                    model_joules=above * float(rng.uniform(1.5, 2.5)) if model else None,
                    calibrated_joules=(above * float(1.0 + rng.normal(0, 0.05))) if model and r > 1 else None))
    truth = None
    if ground_truth:
        truth = {}
        for e in energy:
            truth[e.device] = truth.get(e.device, 0.0) + e.joules * 1.02
    decisions = [{"round": r.round, "policy": "model", "n": r.bits_n, "m": r.bits_m} for r in round_records]
    return RunData(name, Path(f"/runs/{name}"), {"experiment": name, "seed": seed}, round_records, energy,
                   decisions, truth)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_with(name: str, accuracies: list[float], joules_per_round: float, devices: int = 2) -> RunData:
    """A hand-made run: ``devices`` devices each reporting an equal share of ``joules_per_round`` in 'train'."""
    rounds = [RoundRecord(i + 1, acc, 1.0, 8, 8, devices, devices, 1.0) for i, acc in enumerate(accuracies)]
    share = joules_per_round / devices
    energy = [EnergyRecord(f"pi-{d}", i + 1, "train", share, share / 2, 1.0, 100, False, None, None)
              for i in range(len(accuracies)) for d in range(devices)]
    return RunData(name, Path(name), {}, rounds, energy, [], None)


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory: pytest.TempPathFactory):
    runs = [synthetic_run("fp32", 1, bits=(32, 32)), synthetic_run("int8", 2, bits=(8, 8))]
    out = tmp_path_factory.mktemp("report")
    return runs, out, write_report(runs, out, target_accuracy=0.8)


# ---- files and sums ----

def test_report_writes_html_figures_and_csv(two_run_report) -> None:
    runs, out, files = two_run_report
    assert files.html == out / "report.html" and files.html.stat().st_size > 0
    names = sorted(p.name for p in (out / "figures").iterdir())
    expected = sorted([f"{run}-{key}.png" for run in ("fp32", "int8")
                       for key in ("accuracy", "energy-rounds", "energy-devices", "precision")]
                      + ["comparison-accuracy-energy.png", "comparison-energy-to-target.png"])
    assert names == expected
    for path in files.figures:
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in files.csv) == sorted(
        ["rounds.csv", "energy.csv", "errors.csv", "ground_truth.csv", "comparison.csv", "decisions.csv",
         "rejections.csv"])


def test_csv_energy_sums_equal_the_input_records(two_run_report) -> None:
    runs, out, _ = two_run_report
    rows = read_csv(out / "energy.csv")
    for run in runs:
        mine = [r for r in rows if r["run"] == run.name]
        assert len(mine) == len(run.energy)
        for column in ("joules", "joules_above_idle", "model_joules"):
            stored = math.fsum(float(r[column]) for r in mine if r[column])
            given = math.fsum(getattr(e, column) for e in run.energy if getattr(e, column) is not None)
            assert stored == pytest.approx(given, rel=1e-12, abs=0)
        assert sum(r["partial"] == "true" for r in mine) == sum(e.partial for e in run.energy)


def test_cumulative_energy_of_last_round_is_the_measured_total(two_run_report) -> None:
    runs, out, _ = two_run_report
    rounds = read_csv(out / "rounds.csv")
    comparison = {r["run"]: r for r in read_csv(out / "comparison.csv")}
    for run in runs:
        mine = [r for r in rounds if r["run"] == run.name]
        total = math.fsum(e.joules for e in run.energy)
        assert float(mine[-1]["cumulative_j"]) == pytest.approx(total, rel=1e-12)
        assert math.fsum(float(r["measured_j"]) for r in mine) == pytest.approx(total, rel=1e-12)
        assert float(comparison[run.name]["total_measured_j"]) == pytest.approx(total, rel=1e-12)
        cumulative = [float(r["cumulative_j"]) for r in mine]
        assert cumulative == sorted(cumulative)


def test_html_states_the_measured_total_of_each_run(two_run_report) -> None:
    runs, out, _ = two_run_report
    page = (out / "report.html").read_text(encoding="utf-8")
    for run in runs:
        total = format_joules(math.fsum(e.joules for e in run.energy))
        assert f"{total} over {len(run.energy)} energy reports" in page


def test_errors_csv_matches_mape_computed_by_hand(two_run_report) -> None:
    runs, out, _ = two_run_report
    rows = read_csv(out / "errors.csv")
    for run in runs:
        train = [e for e in run.energy if e.phase == "train"]
        by_hand = np.mean([abs(e.model_joules - e.joules_above_idle) / e.joules_above_idle * 100 for e in train])
        with_cal = [e for e in train if e.calibrated_joules is not None]
        by_hand_cal = np.mean([abs(e.calibrated_joules - e.joules_above_idle) / e.joules_above_idle * 100
                               for e in with_cal])
        row = next(r for r in rows if r["run"] == run.name and r["group"] == "phase" and r["key"] == "train")
        assert float(row["mape_model_pct"]) == pytest.approx(by_hand, rel=1e-12)
        wape = sum(abs(e.model_joules - e.joules_above_idle) for e in train) / sum(e.joules_above_idle for e in train)
        assert float(row["wape_model_pct"]) == pytest.approx(wape * 100, rel=1e-12)
        assert float(row["mape_calibrated_pct"]) == pytest.approx(by_hand_cal, rel=1e-12)
        assert int(row["with_calibrated"]) == len(with_cal) < int(row["records"])
        assert float(row["measured_j"]) == pytest.approx(math.fsum(e.joules_above_idle for e in train), rel=1e-12)


# ---- energy to target and savings ----

def test_energy_to_target_and_saving_of_two_runs(tmp_path: Path) -> None:
    base = run_with("base", [0.50, 0.80, 0.92, 0.95], joules_per_round=10.0)
    quant = run_with("quant", [0.60, 0.91, 0.93, 0.96], joules_per_round=12.0)
    table = metrics.compare([base, quant], 0.9)
    assert [(c.target.round, c.target.joules) for c in table] == [(3, pytest.approx(30.0)), (2, pytest.approx(24.0))]
    assert table[0].is_baseline and table[0].saving_pct == pytest.approx(0.0)
    assert table[1].saving_pct == pytest.approx(20.0)

    write_report([base, quant], tmp_path, target_accuracy=0.9)
    rows = {r["run"]: r for r in read_csv(tmp_path / "comparison.csv")}
    assert rows["base"]["baseline"] == "true" and rows["quant"]["baseline"] == "false"
    assert (rows["quant"]["target_round"], float(rows["quant"]["energy_to_target_j"])) == ("2", 24.0)
    assert float(rows["quant"]["saving_pct"]) == pytest.approx(20.0)


def test_named_baseline_and_target_not_reached(tmp_path: Path) -> None:
    base = run_with("base", [0.50, 0.80, 0.92, 0.95], joules_per_round=10.0)
    quant = run_with("quant", [0.60, 0.91, 0.93, 0.96], joules_per_round=12.0)
    table = metrics.compare([base, quant], 0.9, baseline="quant")
    assert table[0].saving_pct == pytest.approx(-25.0) and table[1].is_baseline

    table = metrics.compare([base, quant], 0.955)
    assert not table[0].target.reached and table[0].saving_pct is None
    assert table[1].target.round == 4 and table[1].saving_pct is None

    write_report([base, quant], tmp_path, target_accuracy=0.955)
    rows = {r["run"]: r for r in read_csv(tmp_path / "comparison.csv")}
    assert rows["base"]["reached"] == "false" and rows["base"]["energy_to_target_j"] == ""
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "not reached" in page


def test_energy_of_rounds_without_a_result_counts_towards_later_rounds() -> None:
    run = run_with("gap", [0.5, 0.7, 0.95], joules_per_round=10.0)
    kept = [r for r in run.rounds if r.round != 2]           # round 2 was abandoned: energy stored, no result
    run = RunData(run.name, run.path, {}, kept, run.energy, [], None)
    assert metrics.cumulative_energy(run) == [(1, pytest.approx(10.0)), (3, pytest.approx(30.0))]
    assert metrics.energy_to_target(run, 0.9).joules == pytest.approx(30.0)
    assert any("without a stored result (2)" in note for note in metrics.run_notes(run))


def test_the_headline_says_how_much_energy_went_into_rounds_never_aggregated(tmp_path) -> None:
    run = run_with("cut", [0.5, 0.7, 0.95], joules_per_round=10.0)
    run = RunData(run.name, run.path, {}, run.rounds[:2], run.energy, [], None)   # stopped in round 3
    assert metrics.unaggregated_energy(run) == {3: pytest.approx(10.0)}
    write_report([run], tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "30 J over" in page and "of which 10 J in round 3, never aggregated" in page

    whole = run_with("whole", [0.5, 0.7], joules_per_round=10.0)
    assert metrics.unaggregated_energy(whole) == {}
    write_report([whole], tmp_path)
    assert "never aggregated" not in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_bad_comparison_input_names_what_was_expected() -> None:
    runs = [run_with("a", [0.5], 1.0), run_with("b", [0.6], 1.0)]
    with pytest.raises(ReportError, match="baseline run 'c' is not among the runs: a, b"):
        metrics.compare(runs, 0.9, baseline="c")
    with pytest.raises(ReportError, match=r"target accuracy must be a number in \[0, 1\], got 90"):
        metrics.compare(runs, 90)
    with pytest.raises(ReportError, match="run names must be distinct"):
        write_report([runs[0], runs[0]], Path("/nonexistent-never-written"))
    with pytest.raises(ReportError, match="at least one run"):
        write_report([], Path("/nonexistent-never-written"))


# ---- ground truth ----

def test_ground_truth_agreement_per_device(two_run_report) -> None:
    runs, out, _ = two_run_report
    rows = read_csv(out / "ground_truth.csv")
    for run in runs:
        mine = {r["device"]: r for r in rows if r["run"] == run.name}
        assert sorted(mine) == sorted(run.ground_truth_j)
        for device, truth in run.ground_truth_j.items():
            measured = math.fsum(e.joules for e in run.energy if e.device == device)
            assert float(mine[device]["difference_pct"]) == pytest.approx((measured - truth) / truth * 100)
            assert float(mine[device]["difference_pct"]) == pytest.approx(100 / 1.02 - 100)


def test_device_missing_from_one_side_of_the_ground_truth() -> None:
    run = run_with("gt", [0.5], 4.0)
    run = RunData(run.name, run.path, {}, run.rounds, run.energy, [], {"pi-0": 2.5, "pi-9": 1.0})
    rows = {t.device: t for t in metrics.ground_truth_agreement(run)}
    assert rows["pi-0"].difference_pct == pytest.approx(-20.0)
    assert rows["pi-1"].ground_truth_j is None and rows["pi-1"].difference_pct is None
    assert rows["pi-9"].measured_j == 0.0 and rows["pi-9"].difference_pct == pytest.approx(-100.0)


# ---- the HTML page ----

def test_html_embeds_every_figure_as_png_data_uri_and_loads_nothing(two_run_report) -> None:
    _, out, files = two_run_report
    page = files.html.read_text(encoding="utf-8")
    sources = re.findall(r'<img\s[^>]*src="([^"]*)"', page)
    assert len(sources) == len(files.figures) == 10
    embedded = set()
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        embedded.add(base64.b64decode(src.split(",", 1)[1], validate=True))
    assert embedded == {p.read_bytes() for p in files.figures}
    assert "http://" not in page and "https://" not in page and "href=" not in page
    for tag in ("<script", "<link", "<iframe", "<object", "<embed", "@import", "url("):
        assert tag not in page.lower()


def test_html_escapes_text_from_the_run(tmp_path: Path) -> None:
    run = run_with('<b onclick="x">evil</b>', [0.5, 0.9], 2.0)
    run = RunData(run.name, run.path, {"note": "<script>alert(1)</script>"}, run.rounds, run.energy, [], None)
    page = write_report([run], tmp_path).html.read_text(encoding="utf-8")
    assert "<script>" not in page and '<b onclick' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (tmp_path / "figures" / "b-onclick-x-evil-b-accuracy.png").exists()


def test_config_values_read_as_the_config_file_spells_them(tmp_path: Path) -> None:
    run = run_with("cfg", [0.5, 0.9], 2.0)
    config = {"testbed": {"per_round": None, "stop_at_target": False, "history": None, "lr": 0.2}}
    run = RunData(run.name, run.path, config, run.rounds, run.energy, [], None)
    page = write_report([run], tmp_path).html.read_text(encoding="utf-8")
    assert '<th>testbed.stop_at_target</th><td class="text">false</td>' in page
    assert ">None<" not in page and ">False<" not in page


# ---- robustness ----

def test_run_with_zero_rounds_says_so(tmp_path: Path) -> None:
    run = RunData("empty", tmp_path, {}, [], [], [], None)
    files = write_report([run], tmp_path, target_accuracy=0.9)
    page = files.html.read_text(encoding="utf-8")
    assert files.figures == []
    assert "No rounds were recorded" in page and "No energy reports were stored" in page
    assert "not reached" in page
    rows = read_csv(tmp_path / "rounds.csv")
    assert rows == []


def test_rewriting_a_report_removes_its_own_stale_figures_only(tmp_path: Path) -> None:
    write_report([synthetic_run("r", 8, rounds=2)], tmp_path)
    (tmp_path / "figures" / "mine.png").write_bytes(b"not the report's")
    files = write_report([RunData("r", tmp_path, {}, [], [], [], None)], tmp_path)
    assert files.figures == [] and sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["mine.png"]


def test_run_with_energy_but_no_rounds_still_draws_energy(tmp_path: Path) -> None:
    full = synthetic_run("cut", 5, rounds=2)
    run = RunData("cut", tmp_path, {}, [], full.energy, [], None)
    files = write_report([run], tmp_path)
    assert sorted(p.name for p in files.figures) == ["cut-energy-devices.png", "cut-energy-rounds.png"]
    page = files.html.read_text(encoding="utf-8")
    assert "No rounds were recorded, so there is no accuracy to plot." in page
    assert format_joules(math.fsum(e.joules for e in full.energy)) in page


def test_single_round_and_missing_model_are_reported(tmp_path: Path) -> None:
    run = synthetic_run("one", 3, rounds=1, model=False, ground_truth=False)
    files = write_report([run], tmp_path, target_accuracy=0.99)
    page = files.html.read_text(encoding="utf-8")
    assert len(files.figures) == 4
    assert "Only one round was recorded" in page
    assert "No modelled energy was stored" in page and "No calibrated energy was stored" in page
    assert "No emulator ground-truth logs were found" in page
    errors = read_csv(tmp_path / "errors.csv")
    assert all(r["mape_model_pct"] == "" and r["mape_calibrated_pct"] == "" for r in errors)


def test_nan_accuracy_and_nonpositive_measurements_do_not_break_anything(tmp_path: Path) -> None:
    rounds = [RoundRecord(1, float("nan"), float("nan"), 8, 8, 2, 0, 0.0), RoundRecord(2, 0.95, 0.1, 8, 8, 2, 2, 1.0)]
    energy = [EnergyRecord("pi-0", 1, "uplink", 0.3, -0.01, 0.1, 3, True, 0.02, 0.01),
              EnergyRecord("pi-0", 2, "uplink", 0.3, 0.0, 0.1, 3, False, 0.02, 0.01),
              EnergyRecord("pi-0", 2, "train", 2.0, 1.0, 1.0, 90, False, 1.5, 1.1)]
    run = RunData("odd", tmp_path, {}, rounds, energy, [], None)
    assert metrics.mape(energy, "model") == pytest.approx(50.0)     # only the record with a positive measurement
    assert metrics.energy_to_target(run, 0.9).round == 2
    files = write_report([run], tmp_path)
    assert len(files.figures) == 4


def test_a_figure_that_fails_is_replaced_by_a_sentence(tmp_path: Path) -> None:
    from basestation.report.writer import draw_figure

    def broken():
        raise RuntimeError("no font")

    image, reason = draw_figure("precision", "Precision", "caption", broken, "empty", "r-precision.png", tmp_path)
    assert image is None and reason == "This figure could not be drawn (RuntimeError: no font)."
    assert draw_figure("precision", "Precision", "caption", lambda: None, "nothing to draw", "x.png",
                       tmp_path) == (None, "nothing to draw")
    assert list(tmp_path.iterdir()) == []


def test_unique_names_natural_order_and_large_run_renders(tmp_path: Path) -> None:
    from basestation.report import unique_names
    from basestation.report.data import natural_key

    assert unique_names(["a", "a", "a-2", "b"]) == ["a", "a-2", "a-2-2", "b"]
    assert sorted(["pi-10", "pi-2", "pi-1", "gw", "pi-2b"], key=natural_key) == ["gw", "pi-1", "pi-2", "pi-2b", "pi-10"]
    run = synthetic_run("big", 7, rounds=60, devices=20)
    files = write_report([run], tmp_path)
    assert len(files.figures) == 4
    assert len(read_csv(tmp_path / "energy.csv")) == 60 * 20 * 2
    devices = [r["key"] for r in read_csv(tmp_path / "errors.csv") if r["group"] == "device"]
    assert devices == [f"pi-{d}" for d in range(20)]


# ---- reading a run directory: a real SQLite store, ground-truth logs, the command ----

T0 = 5000.0                       # host time.monotonic() when the run starts
STEP = 0.05                       # ground-truth sample period (s)
IDLE_W = 2.0
TRUE_DEVICE = {"fixed_j": 2e-3, "joules_per_mac": 6e-10, "alpha": 1.0, "joules_per_bit": 3e-8,
               "joules_per_message": 0.01}
READER_ERROR = 0.01               # the meter reader measures 1% more than the emulator's truth
ITERATIONS, BATCH, HEADER_BITS = 5, 32, 800


def _tick(k: int) -> float:
    return T0 + k * STEP


def write_run_dir(root: Path, *, rounds: int = 6, devices: tuple[str, ...] = ("pi-0", "pi-1"), seed: int = 0,
                  precisions: tuple[int, ...] = (32, 16, 8, 12, 8, 8), truth: bool = True, times: bool = True,
                  abandon: tuple[int, ...] = (), plan_model: str = "mlp") -> dict:
    """A run directory as the testbed leaves it, written through the real store; returns what went in."""
    from basestation.energy.calibration import calibrate
    from basestation.energy.records import EnergyRecord as FitRecord
    from basestation.store import Store
    from models import counts, get_architecture

    rng = np.random.default_rng(seed)
    size = counts(get_architecture("mlp"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text('{"name": "mlp-int", "experiment": "exp1"}')
    (root / "config.toml").write_text('experiment = "exp1"\nmodel = "mlp"\n[energy]\npolicy = "measured"\n')
    stored_joules: list[float] = []
    traces: dict[str, list[tuple[float, float]]] = {d: [] for d in devices}
    fit_records = []
    k = 0
    with Store(root / "basestation.sqlite") as store:
        store.create_experiment("exp1", {"model": "mlp"}, now=T0)
        for r in range(1, rounds + 1):
            n = m = precisions[(r - 1) % len(precisions)]
            plan = {"experiment": "exp1", "round": r, "selected": list(devices), "n": n, "m": m,
                    "iterations": ITERATIONS, "batch_size": BATCH, "model": plan_model, "lr": 0.1}
            store.open_round("exp1", r, selected=list(devices), n=n, m=m, deadline=_tick(k) + 60,
                             quorum=len(devices), model_hash=f"h{r}", plan=plan, now=_tick(k))
            opened = _tick(k)
            for d in devices:
                bits = m * size.params + HEADER_BITS
                per_iter = TRUE_DEVICE["fixed_j"] + BATCH * size.macs * TRUE_DEVICE["joules_per_mac"] * (n / 32)
                true_above = {"train": ITERATIONS * per_iter * float(1 + rng.normal(0, 0.02)),
                              "uplink": TRUE_DEVICE["joules_per_message"] + TRUE_DEVICE["joules_per_bit"] * bits}
                phases = {}
                for phase, ticks in (("train", 10 + n), ("uplink", 4)):     # fewer bits, shorter training
                    start, end = k, k + ticks
                    watts = IDLE_W + true_above[phase] / (ticks * STEP)
                    for j in range(start - 2, end + 3):     # idle around the phase, phase power on [start, end]
                        traces[d].append((_tick(j), watts if start <= j <= end else IDLE_W))
                    # pi-1 misses 4 samples of its round-2 training: the reader leaves that energy out
                    gap = (start + 10, start + 14) if (d, r, phase) == ("pi-1", 2, "train") else None
                    covered = (ticks - (gap[1] - gap[0] if gap else 0)) * STEP
                    joules = watts * covered * (1 + READER_ERROR)
                    phases[phase] = {"joules": joules, "joules_above_idle": joules - IDLE_W * covered,
                                     "seconds": ticks * STEP, "samples": ticks * 2, "partial": gap is not None,
                                     "gap_seconds": ticks * STEP - covered, "uncertainty_j": 0.001}
                    if times:
                        phases[phase].update(start=_tick(start), end=_tick(end),
                                             gaps=[[_tick(gap[0]), _tick(gap[1])]] if gap else [])
                    stored_joules.append(joules)
                    k = end + 5
                store.add_update("exp1", device=d, round_=r, nonce=f"u-{d}-{r}", digest="0" * 64, samples=100,
                                 size=bits // 8, m=m, payload=None, now=_tick(k))
                report = {"kind": "energy", "device": d, "experiment": "exp1", "round": r, "n": n, "m": m,
                          "iterations": ITERATIONS, "batch_size": BATCH, "uplink": {"bytes": bits // 8},
                          "meter": {"phases": phases}}           # what edge.runtime sends
                store.add_energy_report("exp1", d, r, f"e-{d}-{r}", report, now=_tick(k))
                fit_records.append(FitRecord(device=d, round=r, n=n, m=m, local_iters=ITERATIONS, batch_size=BATCH,
                                             train_j=phases["train"]["joules_above_idle"],
                                             uplink_j=phases["uplink"]["joules_above_idle"], uplink_bits=bits))
            if r in abandon:
                store.close_round("exp1", r, "abandoned", now=_tick(k))
                continue
            store.close_round("exp1", r, "aggregated", result_hash=f"h{r + 1}", now=_tick(k))
            store.add_evaluation("exp1", r, loss=2.0 / r, accuracy=min(0.5 + 0.1 * r, 0.97), samples=360,
                                 model_hash=f"h{r + 1}", now=_tick(k))
            store.add_calibration("exp1", r, calibrate(fit_records, macs_per_sample=size.macs).to_dict(), now=_tick(k))
            store.add_decision("exp1", r + 1, policy="measured", n=n, m=m, inputs={"records": len(fit_records)},
                               detail={"reason": "explore", "state": {"explored": 1},
                                       "predicted": {"n": n, "energy_j": 1.5, "rounds": None}}, now=_tick(k))
            k += 10
            assert _tick(k) - opened > 0
    if truth:
        folder = root / "ground-truth"
        folder.mkdir()
        for d, rows in traces.items():
            lines = ["host_monotonic_s,meter_s,power_w,current_a,voltage_v"] + [
                f"{t!r},{t - T0!r},{p!r},{p / 5.1!r},5.1" for t, p in rows]
            (folder / f"{d}.csv").write_text("\n".join(lines) + "\n")
    return {"joules": stored_joules, "size": size}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("run") / "mlp-int"
    return root, write_run_dir(root)


def test_load_run_reads_rounds_and_every_stored_energy_phase(run_dir) -> None:
    from basestation.report import load_run

    root, given = run_dir
    run = load_run(root)
    assert run.name == "mlp-int" and run.config["energy"]["policy"] == "measured"
    assert [r.round for r in run.rounds] == [1, 2, 3, 4, 5, 6]
    assert [(r.bits_n, r.bits_m) for r in run.rounds] == [(32, 32), (16, 16), (8, 8), (12, 12), (8, 8), (8, 8)]
    assert [r.accuracy for r in run.rounds] == pytest.approx([0.6, 0.7, 0.8, 0.9, 0.97, 0.97])
    assert all(r.devices_selected == 2 and r.devices_answered == 2 and r.seconds > 0 for r in run.rounds)
    assert len(run.energy) == 6 * 2 * 2
    assert metrics.total_measured_j(run) == pytest.approx(math.fsum(given["joules"]), rel=1e-12)
    assert [d["round"] for d in run.decisions] == [2, 3, 4, 5, 6, 7]
    assert run.decisions[0] == {"round": 2, "policy": "measured", "n": 32, "m": 32, "reason": "explore",
                                "predicted_n": 32, "predicted_energy_j": 1.5}


def test_a_run_at_one_precision_says_why_nothing_was_calibrated(tmp_path: Path) -> None:
    from basestation.report import load_run

    write_run_dir(tmp_path / "one", rounds=3, precisions=(8,))
    run = load_run(tmp_path / "one")
    assert all(e.calibrated_joules is None for e in run.energy) and run.energy
    why = [note for note in run.notes if note.startswith("The basestation's latest calibration could not fit")]
    assert len(why) == 1
    assert "computation: need " in why[0] and "training precisions" in why[0]
    assert "uplink: every uplink sent" in why[0] and "need at least two message sizes" in why[0]
    page = write_report([run], tmp_path / "report").html.read_text(encoding="utf-8")
    assert "could not fit the model yet (computation: need " in page


def test_calibrated_runs_have_no_such_note(run_dir) -> None:
    from basestation.report import load_run

    run = load_run(run_dir[0])
    assert not any("could not fit the model yet" in note for note in run.notes)


def test_modelled_energy_before_and_after_calibration(run_dir) -> None:
    from basestation.energy.calibration import Calibration
    from basestation.energy.testbed_model import PI4_DEFAULTS as P
    from basestation.report import load_run
    from basestation.report.predict import MIN_DEVICE_RECORDS
    from basestation.store import Store

    root, given = run_dir
    run = load_run(root)
    size = given["size"]
    with Store(root / "basestation.sqlite") as store:
        fits = {after: Calibration.from_dict(fit) for after, _, fit in store.calibrations("exp1")}
        plans = {r: store.plan("exp1", r) for r in range(1, 7)}
    for e in run.energy:
        n = plans[e.round]["n"]
        if e.phase == "train":
            expected = ITERATIONS * (P.fixed_j + BATCH * size.macs * P.joules_per_mac * (n / 32) ** P.alpha)
        else:
            expected = P.joules_per_message + P.joules_per_bit * (n * size.params + HEADER_BITS)
        assert e.model_joules == pytest.approx(expected, rel=1e-12)
        if e.round == 1:
            assert e.calibrated_joules is None            # no fit existed before the first round
            continue
        fit = fits[e.round - 1].for_device(e.device, min_records=MIN_DEVICE_RECORDS)   # fitted after round r - 1
        part = fit.compute if e.phase == "train" else fit.uplink
        if not part.ok:
            assert e.calibrated_joules is None            # nothing fitted yet for this part
        elif e.phase == "train":
            assert e.calibrated_joules == pytest.approx(ITERATIONS * float(part.energy_per_iter(n, BATCH)), rel=1e-9)
        else:
            assert e.calibrated_joules == pytest.approx(float(part.energy(n * size.params + HEADER_BITS)), rel=1e-9)
    assert {e.calibrated_joules is None for e in run.energy if e.round > 1} == {True, False}
    overall = metrics.overall_error(run)
    late = metrics.mape([e for e in run.energy if e.round >= 5], "calibrated")
    assert late < 10.0 < overall.mape_model


def test_ground_truth_is_integrated_over_the_measured_phases_without_their_gaps(run_dir) -> None:
    from basestation.report import load_run

    root, _ = run_dir
    run = load_run(root)
    assert sorted(run.ground_truth_j) == ["pi-0", "pi-1"]
    assert sum(e.partial for e in run.energy) == 1
    for row in metrics.ground_truth_agreement(run):
        assert row.difference_pct == pytest.approx(READER_ERROR * 100, abs=1e-6)


def test_ground_truth_needs_phase_times_and_a_covering_log(tmp_path: Path) -> None:
    from basestation.report import load_run

    write_run_dir(tmp_path / "untimed", rounds=2, times=False)
    run = load_run(tmp_path / "untimed")
    assert run.ground_truth_j is None
    assert any("4 of the 4 measured phases of pi-0 carry no start and end times" in n for n in run.notes)

    write_run_dir(tmp_path / "short", rounds=2)
    log = tmp_path / "short" / "ground-truth" / "pi-1.csv"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[: len(lines) // 2]) + "\n")          # the emulator died half-way
    run = load_run(tmp_path / "short")
    assert sorted(run.ground_truth_j) == ["pi-0"]
    assert any(re.search(r"ground-truth log of pi-1 does not cover [1-3] of its 4 measured phases", n)
               for n in run.notes)

    (tmp_path / "short" / "ground-truth" / "pi-0.csv").write_text("time,watts\n1,2\n")
    with pytest.raises(ReportError, match="cannot read the ground-truth log .*pi-0.csv"):
        load_run(tmp_path / "short")


def test_abandoned_rounds_unknown_models_and_experiment_choice(tmp_path: Path) -> None:
    from basestation.report import load_run
    from basestation.store import Store

    given = write_run_dir(tmp_path / "r", rounds=4, abandon=(2,), plan_model="resnet-9000", truth=False)
    run = load_run(tmp_path / "r")
    assert [r.round for r in run.rounds] == [1, 3, 4]
    assert metrics.total_measured_j(run) == pytest.approx(math.fsum(given["joules"]), rel=1e-12)
    assert metrics.cumulative_energy(run)[1][1] == pytest.approx(math.fsum(given["joules"][:12]), rel=1e-12)
    assert any("produced no model" in n and "2 (abandoned)" in n for n in run.notes)
    assert any(n.startswith("16 energy phase(s) could not be modelled: unknown model 'resnet-9000'") for n in run.notes)
    assert all(e.model_joules is None for e in run.energy)

    with Store(tmp_path / "r" / "basestation.sqlite") as store:
        store.create_experiment("exp2", {"model": "cnn"})
    (tmp_path / "r" / "summary.json").unlink()
    (tmp_path / "r" / "config.toml").unlink()
    with pytest.raises(ReportError, match=r"holds 2 experiments \(exp1, exp2\); name one"):
        load_run(tmp_path / "r")
    assert load_run(tmp_path / "r", experiment="exp2").rounds == []
    with pytest.raises(ReportError, match="has no experiment 'exp3'; it has: exp1, exp2"):
        load_run(tmp_path / "r", experiment="exp3")


def test_the_calibration_in_force_is_the_last_one_stored_when_the_round_opened() -> None:
    from basestation.energy.calibration import calibrate
    from basestation.energy.records import EnergyRecord as FitRecord
    from basestation.report.predict import Work, fit_at, predict_phase

    records = [FitRecord(device="pi-0", round=r, n=n, m=8, local_iters=5, batch_size=32, train_j=0.02 * n,
                         uplink_j=0.05, uplink_bits=20_000 + r) for r, n in enumerate((8, 16, 32, 8, 16), start=1)]
    a, b = calibrate(records[:3], macs_per_sample=2368), calibrate(records, macs_per_sample=2368)
    fits = [(10.0, a), (20.0, b)]
    assert [fit_at(t, fits) for t in (9.9, 10.0, 19.9, 20.0, 99.0)] == [None, a, a, b, b]

    work = Work(n=16, m=8, iterations=5, batch_size=32, model="mlp", uplink_bits=None)
    assert predict_phase("pi-0", "aggregate", work, b) == (None, None)
    before, after = predict_phase("pi-0", "uplink", work, None)
    assert after is None and before > 0
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        predict_phase("pi-0", "train", Work(8, 8, 5, 32, "resnet"), None)


@pytest.mark.parametrize("name, text, message", [
    ("summary.json", "{not json", "summary.json is not readable JSON"),
    ("summary.json", "[1, 2]", "summary.json must hold a JSON object, got list"),
    ("config.toml", "model = ", "config.toml is not readable TOML"),
    ("store.sqlite", "", "is an empty file"),
    ("other.db", "", "holds several stores (other.db, store.sqlite); name one in summary.json"),
])
def test_unreadable_run_directory_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    from basestation.report import load_run

    (tmp_path / "store.sqlite").write_bytes(b"")
    (tmp_path / name).write_text(text)
    with pytest.raises(ReportError) as caught:
        load_run(tmp_path)
    assert message in str(caught.value)


def test_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    import sqlite3

    from basestation.report import load_run

    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ReportError, match=r"cannot read the store .*other.db: .*not a qfl store"):
        load_run(tmp_path)


def test_a_store_damaged_past_its_header_is_named_not_a_traceback(tmp_path: Path) -> None:
    import sqlite3

    from basestation.report import load_run

    write_run_dir(tmp_path / "run")
    store = tmp_path / "run" / "basestation.sqlite"
    with sqlite3.connect(store) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page, pages = db.execute("PRAGMA page_size").fetchone()[0], db.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 3
    with open(store, "r+b") as fh:  # every page but the header's, as a bad sector or a torn copy would
        fh.seek(page)
        fh.write(bytes(range(256)) * (page * (pages - 1) // 256))
    with pytest.raises(ReportError, match=r"the store .*basestation.sqlite is damaged: .*malformed"):
        load_run(tmp_path / "run")


def test_qfl_report_command_on_a_run_directory(run_dir, capsys: pytest.CaptureFixture) -> None:
    from edge.cli import main

    root, given = run_dir
    assert main(["report", str(root), "--target-accuracy", "0.85"]) == 0
    out = capsys.readouterr().out
    assert "run mlp-int: 6 rounds" in out and "accuracy 0.85 at round 4" in out
    assert f"report: {root / 'report.html'}" in out
    row = read_csv(root / "comparison.csv")[0]
    assert float(row["total_measured_j"]) == pytest.approx(math.fsum(given["joules"]), rel=1e-12)
    assert row["target_round"] == "4"
    energy = read_csv(root / "energy.csv")
    assert math.fsum(float(r["joules"]) for r in energy) == pytest.approx(math.fsum(given["joules"]), rel=1e-12)
    assert len(list((root / "figures").glob("*.png"))) == 4
    truth = read_csv(root / "ground_truth.csv")
    assert [float(r["difference_pct"]) for r in truth] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_qfl_report_compares_runs_into_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edge.cli import main

    write_run_dir(tmp_path / "a", seed=1, truth=False)
    write_run_dir(tmp_path / "b", seed=2, precisions=(8, 8, 8), truth=False)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp"),
                 "--baseline", "mlp-int-2", "--target-accuracy", "0.75"]) == 0
    rows = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    assert sorted(rows) == ["mlp-int", "mlp-int-2"] and rows["mlp-int-2"]["baseline"] == "true"
    a, b = (float(rows[k]["energy_to_target_j"]) for k in ("mlp-int", "mlp-int-2"))
    assert float(rows["mlp-int"]["saving_pct"]) == pytest.approx((b - a) / b * 100)
    assert a > b                                   # run a trains at 32 and 16 bits first
    assert "mlp-int-2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "holds no basestation store"),
    (["{run}", "{run}"], "needs --out DIR"),
    (["{run}", "--target-accuracy", "1.5"], "--target-accuracy must be in (0, 1], got 1.5"),
    (["{run}", "--baseline", "nope"], "baseline run 'nope' is not among the runs: mlp-int"),
])
def test_qfl_report_errors_are_one_clear_line(run_dir, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              args: list[str], message: str) -> None:
    from edge.cli import main

    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "run": run_dir[0]}
    assert main(["report", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qfl report: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_the_report_command_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = ("import sys, basestation.report.cli; "
            "print(sorted(m for m in ('numpy', 'matplotlib', 'basestation.store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_refused_and_dropped_updates_reach_the_report(tmp_path: Path) -> None:
    """A bound violation the basestation stored is listed, with its reason, in the HTML and rejections.csv."""
    from basestation.report import load_run
    from basestation.store import Store

    root = tmp_path / "attacked"
    write_run_dir(root, truth=False)
    (store_path,) = root.glob("*.sqlite")
    with Store(store_path) as store:
        store.add_rejection("exp1", "update", "out_of_bounds", device="pi-1", round_=3,
                            detail="dropped on restart: value 1.7e38 beyond the bound 4")
        store.add_rejection("exp1", "energy", "out_of_bounds", device="pi-0", round_=4, detail="1e+300 J")
    run = load_run(root)
    assert [(r["round"], r["device"], r["kind"], r["reason"]) for r in run.rejections] == [
        (3, "pi-1", "update", "out_of_bounds"), (4, "pi-0", "energy", "out_of_bounds")]
    files = write_report([run], tmp_path / "report")
    rows = read_csv(tmp_path / "report" / "rejections.csv")
    assert [(r["round"], r["reason"]) for r in rows] == [("3", "out_of_bounds"), ("4", "out_of_bounds")]
    page = files.html.read_text()
    assert "Refused and dropped messages" in page and "value 1.7e38 beyond the bound 4" in page
    assert "the basestation refused nothing" not in page
