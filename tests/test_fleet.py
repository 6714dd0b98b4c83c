"""The fleet emulator: many meters in one process, each on its own pty, each powered by its own process."""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.meter import PowerMeter
from firmware_tools.emulator import get_board, read_ground_truth, truth_energy
from firmware_tools.emulator.fleet import FleetEmulator
from basestation.broker import free_port
from firmware_tools.emulator.link import get_link
from firmware_tools.emulator.procwatch import ProcessWatcher
from test_meter_emulator import _wait_for

_SPIN = "import time\nwhile True:\n    t = time.monotonic()\n    while time.monotonic() - t < 0.5: pass\n"


def _cpu(pid: int) -> float:
    with ProcessWatcher(pid) as watcher:
        return watcher.sample().cpu_seconds


@pytest.mark.slow
def test_each_meter_follows_its_own_process(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", _SPIN])
    idle = subprocess.Popen(["sleep", "60"])
    spec = tmp_path / "fleet.jsonl"
    fleet = FleetEmulator(board="pi4", rate_hz=250, tick_seconds=0.01)
    runner = threading.Thread(target=fleet.run, args=(spec,))
    try:
        runner.start()
        with open(spec, "w") as fh:  # added while the loop runs, as the testbed does
            for name, proc in (("busy", busy), ("idle", idle)):
                fh.write(json.dumps({"pid": proc.pid, "link": str(tmp_path / f"{name}.tty"), "seed": proc.pid,
                                     "ground_truth": str(tmp_path / f"{name}.csv")}) + "\n")
        assert _wait_for(lambda: (tmp_path / "busy.tty").exists() and (tmp_path / "idle.tty").exists())
        with PowerMeter(str(tmp_path / "busy.tty"), idle_seconds=0) as m_busy, \
                PowerMeter(str(tmp_path / "idle.tty"), idle_seconds=0) as m_idle:
            cpu0 = _cpu(busy.pid)
            with m_busy.phase("p"), m_idle.phase("p"):
                time.sleep(2.0)
            cpu1 = _cpu(busy.pid)
            e_busy, e_idle = m_busy.phase_energy("p"), m_idle.phase_energy("p")
    finally:
        fleet.stop()
        runner.join(10)
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    board = get_board("pi4")
    # Each meter saw its own process: the spinning one draws the core power for its CPU seconds, the
    # sleeping one stays at the board's idle power.
    above_idle_busy = e_busy.joules - board.idle_w * e_busy.seconds
    above_idle_idle = e_idle.joules - board.idle_w * e_idle.seconds
    expected = board.core_w * (cpu1 - cpu0)
    assert above_idle_busy == pytest.approx(expected, rel=0.15)
    assert abs(above_idle_idle) < 0.1 * expected
    # What the reader measured is what the emulator simulated.
    for name, energy in (("busy", e_busy), ("idle", e_idle)):
        truth = read_ground_truth(tmp_path / f"{name}.csv")
        assert energy.joules == pytest.approx(truth_energy(truth, energy.start, energy.end), rel=0.01)
    # Every pty and link is gone, and the loop accounted for both meters.
    assert not (tmp_path / "busy.tty").exists() and not (tmp_path / "idle.tty").exists()
    assert fleet.stats.devices_added == 2 and fleet.stats.samples > 0 and not fleet.meters


def test_fleet_drops_a_device_whose_process_ended(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "0.3"])
    fleet = FleetEmulator(tick_seconds=0.01)
    fleet.add(pid=child.pid, link=tmp_path / "m.tty")
    assert (tmp_path / "m.tty").is_symlink()
    child.wait()
    stats = fleet.run(until=lambda: not fleet.meters or fleet.stats.ticks > 500)
    assert not fleet.meters and not (tmp_path / "m.tty").exists()
    assert stats.ticks < 500


def test_fleet_cli_writes_its_stats_on_sigterm(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spec, stats = tmp_path / "fleet.jsonl", tmp_path / "stats.json"
    spec.write_text(json.dumps({"pid": child.pid, "link": str(tmp_path / "m.tty")}) + "\n")
    fleet = subprocess.Popen([sys.executable, "-m", "edge.cli", "meter", "fleet", "--spec", str(spec),
                              "--stats", str(stats)], stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (tmp_path / "m.tty").exists())
    finally:
        fleet.send_signal(signal.SIGTERM)
        _, err = fleet.communicate(timeout=15)
        child.kill()
        child.wait()
    assert fleet.returncode == 0, err
    doc = json.loads(stats.read_text())
    assert doc["devices_added"] == 1 and doc["ticks"] > 0 and "cpu_share" in doc
    assert not (tmp_path / "m.tty").exists()


def test_fleet_cli_bad_tick_is_one_line_exit_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "meter", "fleet", "--spec", str(tmp_path / "s"),
                          "--tick-ms", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--tick-ms" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("spec_text, message", [
    ("not json\n", "{spec} line 1 is not JSON (Expecting value)"),
    ('\n{"link": "L"}\n', "{spec} line 2: missing 'pid' (each line needs pid and link)"),
    ('[1, 2]\n', "{spec} line 1: expected a JSON object"),
    ('{"pid": "me", "link": "L"}\n', "{spec} line 1: pid must be a process id"),
    ('{"pid": PID, "link": "/nonexistent/m.tty"}\n', "{spec} line 1: directory /nonexistent does not exist"),
    ('{"pid": PID, "link": "L", "ground_truth": "/nonexistent/t.csv"}\n',
     "{spec} line 1: No such file or directory: /nonexistent/t.csv"),
])
def test_fleet_cli_bad_spec_line_names_file_and_line(spec_text: str, message: str, tmp_path: Path) -> None:
    spec = tmp_path / "fleet.jsonl"
    link = tmp_path / "m.tty"
    spec.write_text(spec_text.replace("PID", str(os.getpid())).replace('"L"', json.dumps(str(link))))
    out = subprocess.run([sys.executable, "-m", "edge.cli", "meter", "fleet", "--spec", str(spec)],
                         capture_output=True, text=True, timeout=30)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert last.startswith("qfl meter fleet: error:") and message.format(spec=spec) in last
    assert not link.exists()


@pytest.mark.parametrize("options, message", [
    (["--spec", "DIR"], "--spec DIR is a directory"),
    (["--spec", ""], "argument --spec: an empty path names nothing; give a file or folder"),
    (["--spec", "SPEC", "--rate", "0"], "argument --rate: must be 1..5000 Hz, got 0"),
])
def test_fleet_cli_bad_options_are_one_line_exit_2(options: list[str], message: str, tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    spec = tmp_path / "fleet.jsonl"
    spec.write_text(json.dumps({"pid": child.pid, "link": str(tmp_path / "m.tty")}) + "\n")
    argv = [str(spec) if o == "SPEC" else str(tmp_path) if o == "DIR" else o for o in options]
    try:
        out = subprocess.run([sys.executable, "-m", "edge.cli", "meter", "fleet", *argv],
                             capture_output=True, text=True, timeout=30)
    finally:
        child.kill()
        child.wait()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message.replace("DIR", str(tmp_path)) in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m.tty").exists()


def test_fleet_device_with_a_link_pays_airtime_for_its_own_bytes(tmp_path: Path) -> None:
    """A ``net`` entry gives that device its own relay: bytes sent through it light up its radio, not the other's."""
    links = tmp_path / "links.toml"
    links.write_text('[slow]\ndescription = "test"\nrate_bps = 200e3\nlatency_s = 0.0\ntx_power_w = 2.0\n'
                     'channel = "fixed"\n')
    slow = get_link("slow", links)
    sink = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def drain() -> None:
        conn, _ = sink.accept()
        while data := conn.recv(65536):
            received.extend(data)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    talker, quiet = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    fleet = FleetEmulator(board="pi4", rate_hz=250, tick_seconds=0.01, links_file=links)
    host, port = sink.getsockname()
    relay_port = free_port()
    fleet.add(pid=talker.pid, link=tmp_path / "talker.tty", seed=1, ground_truth=tmp_path / "talker.csv",
              net={"profile": "slow", "relay_port": relay_port, "upstream": f"{host}:{port}", "seed": 0, "index": 0})
    fleet.add(pid=quiet.pid, link=tmp_path / "quiet.tty", seed=2, ground_truth=tmp_path / "quiet.csv")
    runner = threading.Thread(target=fleet.run)
    payload = bytes(range(256)) * 100  # 25,600 bytes: 1.02 s on air at 200 kbit/s
    try:
        runner.start()
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", relay_port)) as device:
            device.sendall(payload)
            assert _wait_for(lambda: len(received) == len(payload), 10.0)
        time.sleep(0.3)
    finally:
        fleet.stop()
        runner.join(10)
        for proc in (talker, quiet):
            proc.kill()
            proc.wait()
        sink.close()
    assert bytes(received) == payload
    airtime = len(payload) * 8 / slow.rate_bps
    board = get_board("pi4")
    for name, radio_joules in (("talker", slow.tx_power_w * airtime), ("quiet", 0.0)):
        truth = read_ground_truth(tmp_path / f"{name}.csv")
        t, power = truth["host_monotonic_s"], truth["power_w"]
        above_idle = float(np.sum(power - board.idle_w) * np.median(np.diff(t)))
        assert above_idle == pytest.approx(radio_joules, abs=0.15 * slow.tx_power_w * airtime)
    assert not fleet.relays and not fleet.meters

