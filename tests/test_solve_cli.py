"""The ``qfl solve`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basestation.energy.calibration import calibrate
from basestation.energy.records import EnergyRecord
from edge.cli import main

QFL = Path(sys.executable).with_name("qfl")


def solve(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["solve", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_console_script_prints_the_joint_optimum_as_json():
    done = subprocess.run([str(QFL), "solve", "--preset", "kim2022", "--epsilon", "0.1", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_min"] == 15
    opt, base = result["optimum"], result["baseline"]
    assert (opt["I"], opt["K"], opt["m"], opt["n"]) == (1, 1, 11, 18)
    assert (base["m"], base["n"]) == (32, 32)
    for point in (opt, base):
        assert set(point) >= {"I", "K", "m", "n", "energy_j", "rounds"}
    assert result["saving"] == pytest.approx(0.46, abs=0.03)
    assert result["saving"] == pytest.approx(1 - opt["energy_j"] / base["energy_j"])


def test_tied_line_search(capsys):
    status, out, _ = solve(capsys, "--tied", "--local-iters", "1", "--devices", "5", "--json", "--epsilon", "0.1")
    result = json.loads(out)
    assert status == 0 and result["mode"] == "tied"
    assert (result["optimum"]["n"], result["optimum"]["m"]) == (17, 17)
    assert (result["baseline"]["I"], result["baseline"]["K"]) == (1, 5)
    assert result["saving"] == pytest.approx(0.35, abs=0.03)


def test_n_min_follows_epsilon(capsys):
    for eps, expected in (("0.01", 17), ("0.001", 19)):
        status, out, _ = solve(capsys, "--tied", "--epsilon", eps, "--json")
        assert status == 0 and json.loads(out)["n_min"] == expected


def test_human_output_is_a_table(capsys):
    status, out, _ = solve(capsys, "--tied", "--pareto")
    assert status == 0
    assert "optimum" in out and "32-bit baseline" in out and "Nash bargaining" in out
    assert "saving against the baseline" in out and "n_min: 15" in out


def test_pareto_and_nash_in_json(capsys):
    status, out, _ = solve(capsys, "--pareto", "--json", "--local-iters", "1")
    result = json.loads(out)
    front = result["pareto"]
    assert status == 0 and len(front) > 5
    assert all(p["I"] == 1 for p in front)
    assert front[0]["energy_j"] == pytest.approx(result["optimum"]["energy_j"])
    assert result["nash"] in front


def test_testbed_preset_with_plot(capsys, tmp_path):
    png = tmp_path / "precision.png"
    status, out, _ = solve(capsys, "--preset", "testbed", "--model", "mlp", "--json", "--plot", str(png))
    result = json.loads(out)
    assert status == 0 and result["preset"] == "testbed" and "d=2410" in result["description"]
    assert 1 <= result["optimum"]["n"] <= 32 and result["saving"] >= 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_testbed_preset_from_a_calibration_file(capsys, tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for r in range(30):
        n, m = int(rng.integers(4, 33)), int(rng.integers(4, 33))
        records.append(EnergyRecord(device=f"pi-{r % 3}", round=r // 3, n=n, m=m, local_iters=2, batch_size=32,
                                    train_j=2 * (1e-3 + 1e-3 * (n / 32) ** 1.5) * (1 + 0.01 * rng.standard_normal()),
                                    uplink_j=(3e-3 + 4e-8 * m * 2410) * (1 + 0.01 * rng.standard_normal()),
                                    uplink_bits=m * 2410))
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibrate(records, macs_per_sample=2368).to_dict()))
    status, out, _ = solve(capsys, "--preset", "testbed", "--calibration", str(path), "--fleet", "3", "--json")
    assert status == 0 and "calibrated" in json.loads(out)["description"]


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "-1"], "--epsilon must be a positive number"),
    (["--epsilon", "1e-12"], "n_min=34"),
    (["--model", "mlp"], "--model applies to --preset testbed only"),
    (["--preset", "testbed", "--model", "resnet"], "unknown model 'resnet'"),
    (["--devices", "60"], "--devices must be in 1..50"),
    (["--preset", "testbed", "--calibration", "/nonexistent/cal.json"], "cannot read the calibration"),
    (["--epsilon", "100"], "--epsilon 100 is met without any training"),
    (["--epsilon", "100", "--tied"], "--epsilon 100 is met without any training"),
    (["--preset", "testbed", "--draws", "5"], "--draws applies to --preset kim2022 only"),
    (["--plot", "curve.txt"], "--plot curve.txt: the file name must end in one of"),
])
def test_bad_input_is_a_clear_error(capsys, args, message):
    status, _, err = solve(capsys, *args)
    assert status == 2
    assert message in err


def test_calibration_file_must_be_a_calibration(capsys, tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    status, _, err = solve(capsys, "--preset", "testbed", "--calibration", str(bad))
    assert status == 2 and "is not JSON" in err
    bad.write_text(json.dumps({"records": 1}))
    status, _, err = solve(capsys, "--preset", "testbed", "--calibration", str(bad))
    assert status == 2 and "not a calibration dict" in err
