"""The emulated testbed end to end: real Mosquitto, real edge processes, emulated meters on ptys."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from basestation.config import BasestationConfig
from basestation.testbed.prepare import prepare_run
from basestation.testbed.settings import TestbedSettings

pytestmark = pytest.mark.slow


def live_processes_mentioning(text: str) -> dict[int, str]:
    """Pid -> command line of live processes whose arguments contain ``text`` (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain ``text`` (zombies excluded)."""
    return list(live_processes_mentioning(text).values())


def leftover_links(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("provision/devices/*/meter.tty") if p.is_symlink() or p.exists()]


def qfl(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def test_short_run_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(qfl("testbed", "--devices", "2", "--rounds", "3", "--out", str(tmp_path), "--name", "short",
                             "--policy", "fixed", "--json"), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    run_dir = tmp_path / "short"
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["devices"] == 2
    assert 0.0 < summary["final_accuracy"] <= 1.0
    assert summary["accuracy"][-1] > summary["accuracy"][0]
    for key in ("energy_j", "energy_model_j", "seconds"):
        assert summary[key] is not None and summary[key] > 0, key
    # The closing line sets the model against the energy above idle, the quantity it predicts.
    assert (f"{summary['energy_above_idle_j']:.3g} J of it above idle, where the model said "
            f"{summary['energy_model_j']:.3g} J") in out.stderr
    # A fixed run holds one precision, so the fit cannot calibrate: the line says where to read why.
    assert summary["energy_calibrated_j"] is None
    assert "(no calibrated figure: the report's notes say why)" in out.stderr

    # The measured energy is the sum of the stored energy reports ...
    with sqlite3.connect(run_dir / "store.sqlite") as db:
        reports = [json.loads(row[0]) for row in db.execute("SELECT report FROM energy_reports")]
    stored = math.fsum(phase["joules"] for report in reports for phase in report["meter"]["phases"].values())
    assert len(reports) == 2 * 3
    assert summary["energy_j"] == pytest.approx(stored, rel=1e-9)
    # ... and agrees with what the emulators really simulated.
    assert summary["ground_truth_j"] is not None
    assert abs(summary["ground_truth_error"]) < 0.02

    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert list((run_dir / "figures").glob("*.png"))
    assert processes_mentioning(str(run_dir)) == []
    assert leftover_links(run_dir) == []


def start_interruptible_run(tmp_path: Path, name: str) -> subprocess.Popen:
    """A testbed of far more rounds than can finish, returned once a round has closed and children run."""
    run_dir = tmp_path / name
    # The child gets SIGINT's default action back: a shell that starts the suite in the background without job
    # control ignores SIGINT, every process inherits that, and Python then installs no KeyboardInterrupt handler.
    testbed = subprocess.Popen(qfl("testbed", "--devices", "2", "--rounds", "5000", "--out", str(tmp_path),
                                   "--name", name, "--policy", "fixed"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and testbed.poll() is None:
        store = run_dir / "store.sqlite"
        if store.exists():
            with contextlib.suppress(sqlite3.Error):
                with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                    if db.execute("SELECT COUNT(*) FROM rounds WHERE status != 'open'").fetchone()[0] >= 1:
                        break
        time.sleep(0.2)
    assert testbed.poll() is None, testbed.stdout.read() if testbed.stdout else ""
    assert processes_mentioning(str(run_dir))  # the run really has children now
    return testbed


def kill_what_is_left(testbed: subprocess.Popen, run_dir: Path) -> None:
    if testbed.poll() is None:
        testbed.kill()
        testbed.wait()
    for pid in live_processes_mentioning(str(run_dir)):  # its children run in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigint_stops_every_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    testbed = start_interruptible_run(tmp_path, "interrupted")
    try:
        testbed.send_signal(signal.SIGINT)
        output, _ = testbed.communicate(timeout=60)
    finally:
        kill_what_is_left(testbed, run_dir)
    assert testbed.returncode == 130, output[-2000:]
    assert "interrupted" in output
    assert processes_mentioning(str(run_dir)) == []
    assert leftover_links(run_dir) == []
    assert (run_dir / "store.sqlite").exists()  # what was stored stays


def test_a_killed_testbed_leaves_no_process_behind(tmp_path: Path) -> None:
    # SIGKILL gives the testbed no chance to stop its children: the orphan guard does it.
    run_dir = tmp_path / "killed"
    testbed = start_interruptible_run(tmp_path, "killed")
    try:
        testbed.kill()
        testbed.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_mentioning(str(run_dir))
    finally:
        kill_what_is_left(testbed, run_dir)
    assert left == []
    with sqlite3.connect(f"file:{run_dir / 'store.sqlite'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # what was stored stays


def test_training_options_reach_the_basestation_config(tmp_path: Path) -> None:
    settings = TestbedSettings(devices=2, lr=0.3, momentum=0.9, iterations=7, out=tmp_path, name="opts").checked()
    layout = prepare_run(settings, "mqtt://127.0.0.1:1")
    training = BasestationConfig.load(layout.basestation_config).training
    assert (training.lr, training.momentum, training.iterations) == (0.3, 0.9, 7)


@pytest.mark.parametrize("args, message", [
    (["--model", "cnn-mnist"], "model 'cnn-mnist' takes inputs of shape (1, 28, 28), but dataset 'digits' has (64,)"),
    (["--partition", "halves"], "unknown partition 'halves'"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--model", "resnet"], "--model: unknown model 'resnet'"),
    (["--iterations", "0"], "--iterations must be 1..100000, got 0"),
    (["--deadline", "inf"], "--deadline must be a positive number of seconds, got inf"),
])
def test_bad_input_fails_before_anything_starts_or_is_written(
        args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main

    assert main(["testbed", "--out", str(tmp_path / "runs"), "--name", "bad", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qfl testbed: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main

    (tmp_path / "runs").write_text("")
    assert main(["testbed", "--out", str(tmp_path / "runs")]) == 2
    assert "is a file; it must be a folder" in capsys.readouterr().err


def test_an_unreadable_history_is_named_before_the_run_starts(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main

    noise = tmp_path / "noise.sqlite"
    noise.write_bytes(bytes(range(256)) * 8)
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    for history, message in ((noise, "is not text"), (damaged, "cannot read the store")):
        assert main(["testbed", "--out", str(tmp_path / "runs"), "--name", "h", "--history", str(history)]) == 2
        err = capsys.readouterr().err
        assert f"--history {history}: " in err and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "runs" / "h").exists()
