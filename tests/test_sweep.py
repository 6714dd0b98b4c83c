"""qfl sweep: bad input, a small real sweep, its --json object, and resuming a killed sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from basestation.sweep.grid import Grid, GridError, parse_bits, parse_policies
from basestation.sweep.runner import same_sweep, spec_of
from basestation.testbed.settings import TestbedSettings
from edge.cli import main as qfl


@pytest.mark.parametrize("args, expected", [
    (["--link", "5g"], "loopback, wifi, lte-m, kim2022"),
    (["--grid-bits", ""], "--grid-bits is empty"),
    (["--grid-uplink-bits", "4,40"], "bit widths 1..32"),
    (["--grid-iterations", "0"], "local iterations 1..1000"),
    (["--policies", "fl32,greedy"], "valid: fl32, model, measured"),
    (["--board", "pi3"], "valid: pi-zero-2w, pi4, pi5"),
    (["--meters", "both"], "--meters must be one of fleet, process"),
    (["--momentum", "1"], "--momentum must be in [0, 0.999], got 1.0"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--model", "cnn-mnist"], "model 'cnn-mnist' takes inputs of shape (1, 28, 28), but dataset 'digits' has (64,)"),
    (["--partition", "halves"], "unknown partition 'halves'"),
    (["--iterations", "0"], "--iterations must be 1..100000, got 0"),
    (["--deadline", "nan"], "--deadline must be a positive number of seconds, got nan"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, capsys, tmp_path):
    assert qfl(["sweep", "--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing ran, nothing written


def test_grid_parsing():
    assert parse_bits("--grid-bits", "32, 4,8") == (4, 8, 32)
    with pytest.raises(GridError, match="twice"):
        parse_bits("--grid-bits", "4,4")
    assert parse_policies("") == ()


def test_a_sweep_stored_before_an_option_existed_resumes_only_with_its_default():
    grid = Grid((32,), (4, 32), (5,))
    stored = json.loads(json.dumps(spec_of(TestbedSettings(), grid, 1)))
    del stored["testbed"]["momentum"]  # written before --momentum existed
    assert same_sweep(stored, json.loads(json.dumps(spec_of(TestbedSettings(), grid, 1))))
    assert not same_sweep(stored, json.loads(json.dumps(spec_of(TestbedSettings(momentum=0.9), grid, 1))))
    assert not same_sweep(stored, json.loads(json.dumps(spec_of(TestbedSettings(lr=0.3), grid, 1))))


SWEEP = ["sweep", "--grid-bits", "32", "--grid-uplink-bits", "4,32", "--grid-iterations", "5", "--policies",
         "measured", "--seeds", "1", "--devices", "2", "--rounds", "3", "--iterations", "5",
         "--target-accuracy", "0.5", "--link", "lte-m"]


@pytest.mark.slow
def test_small_real_sweep_prints_the_issue_object_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert qfl([*SWEEP, "--out", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) == {"target_accuracy", "settings", "hindsight_best", "policies"}
    assert [(s["n"], s["m"], s["I"], s["seed"]) for s in obj["settings"]] == [(32, 4, 5, 0), (32, 32, 5, 0)]
    for s in obj["settings"]:
        assert set(s) == {"n", "m", "I", "seed", "energy_to_target_j", "rounds_to_target"}
        assert (s["energy_to_target_j"] is None) == (s["rounds_to_target"] is None)
    assert set(obj["policies"]) == {"measured"}
    for p in obj["policies"].values():
        assert set(p) == {"energy_to_target_j", "regret", "saving_vs_fl32"}
    reached = {(s["m"]): s["energy_to_target_j"] for s in obj["settings"] if s["energy_to_target_j"] is not None}
    if obj["hindsight_best"] is not None:
        assert obj["hindsight_best"]["energy_to_target_j"] == min(reached.values())
        if 4 in reached and 32 in reached:
            assert reached[4] < reached[32]  # on LTE-M a 4-bit uplink pays for itself
    assert obj["policies"]["measured"]["saving_vs_fl32"] is None  # no fl32 run asked for
    html = (out / "report.html").read_text()
    assert html.count("<img") == 1 and (out / "curves.json").exists()
    assert "Energy model, train phase" in html and "with the per-n table" in html
    assert "fewer than three I in the grid" in html  # one I: leave one I out cannot test the I exponent

    # A sweep killed during its last run: the results file lacks that line, its run directory is half written.
    results = (out / "results.jsonl").read_text().splitlines()
    assert len(results) == 3
    (out / "results.jsonl").write_text("\n".join(results[:-1]) + "\n")
    kept = {json.loads(r)["key"]: os.stat(Path(json.loads(r)["run_dir"]) / "store.sqlite").st_mtime_ns
            for r in results[:-1]}
    assert qfl([*SWEEP, "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["settings"] == obj["settings"]
    lines = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == [json.loads(r)["key"] for r in results]
    for row in lines[:-1]:  # the finished runs were not run again
        assert os.stat(Path(row["run_dir"]) / "store.sqlite").st_mtime_ns == kept[row["key"]]

    # Damaged lines (not JSON, JSON that is not a result row) are left out and said, not a traceback.
    with open(out / "results.jsonl", "ab") as fh:
        fh.write(b'[1, 2]\n{"key": "fixed-n8-m8-I5-s0", "kind": "fixed"}\n\xff\xfe\n')
    assert qfl([*SWEEP, "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    latest = json.loads(captured.out)
    assert latest["settings"] == obj["settings"] and set(latest["policies"]) == {"measured"}
    assert "3 line(s) are not result rows" in " ".join(captured.err.split())
    spec = (out / "sweep.json").read_bytes()
    (out / "sweep.json").write_bytes(spec[: len(spec) // 2])
    assert qfl([*SWEEP, "--out", str(out)]) == 2
    assert "sweep.json is damaged" in capsys.readouterr().err
    (out / "sweep.json").write_bytes(spec)

    # Resumed without --policies, the measured policy's finished runs are still in the summary.
    assert qfl([*[a if a != "measured" else "" for a in SWEEP], "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policies"] == latest["policies"]

    # The same --out with a different grid is refused, not mixed in.
    assert qfl([*[a if a != "4,32" else "8" for a in SWEEP], "--out", str(out)]) == 2
    assert "holds a different sweep" in capsys.readouterr().err
