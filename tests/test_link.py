"""Link emulation: profiles, the relay that delays real bytes, and the radio power reaching the meter's model."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main as qfl
from firmware_tools.emulator import MeterEmulator, read_ground_truth
from firmware_tools.emulator.link import LinkProfile, LinkProfileError, RadioLog, Relay, get_link, load_links


def test_shipped_profiles_load_and_each_is_cited_in_the_board_docs():
    links = load_links()
    assert list(links) == ["loopback", "wifi", "lte-m", "kim2022"]
    assert not links["loopback"].emulated and all(links[n].emulated for n in ("wifi", "lte-m", "kim2022"))
    assert links["lte-m"].rate_bps < links["wifi"].rate_bps  # a few hundred kbit/s against tens of Mbit/s
    docs = (Path(__file__).parents[1] / "docs" / "boards.md").read_text()
    section = docs[docs.index("## Links"):]
    for name in links:
        assert f"`{name}`" in section


def test_unknown_link_lists_the_valid_names(tmp_path):
    with pytest.raises(LinkProfileError, match="choose one of: loopback, wifi, lte-m, kim2022"):
        get_link("5g")
    bad = tmp_path / "links.toml"
    bad.write_text('[x]\ndescription = "x"\nrate_bps = -1\nlatency_s = 0\ntx_power_w = 0\nchannel = "fixed"\n')
    with pytest.raises(LinkProfileError, match="non-negative"):
        load_links(bad)


def test_kim2022_draws_a_seeded_distance_and_fading_per_device():
    profile = get_link("kim2022")
    a, again, other = (profile.for_device(seed=s, index=i) for s, i in ((0, 1), (0, 1), (0, 2)))
    assert a == again and a.rate_bps != other.rate_bps
    assert 1.0 * math.sqrt(2) <= a.distance_m <= 500.0 * math.sqrt(2)
    snr = profile.tx_power_w * a.fading * a.distance_m ** -4 / (profile.bandwidth_hz * profile.noise_w_per_hz)
    assert a.rate_bps == pytest.approx(profile.bandwidth_hz * math.log2(1 + snr))


def _sink(server: socket.socket, received: list[tuple[float, bytes]]) -> None:
    conn, _ = server.accept()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            received.append((time.monotonic(), data))


def test_relay_delays_the_real_bytes_by_airtime_plus_latency():
    profile = LinkProfile(name="slow", description="test", rate_bps=400_000.0, latency_s=0.05, tx_power_w=1.0)
    server = socket.create_server(("127.0.0.1", 0))
    received: list[tuple[float, bytes]] = []
    sink = threading.Thread(target=_sink, args=(server, received), daemon=True)
    sink.start()
    radio = RadioLog()
    payload = bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8))
    with Relay(profile, radio, listen_port=0, upstream=server.getsockname()) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as device:
            device.sendall(payload)
            device.shutdown(socket.SHUT_WR)
            sink.join(10.0)
    server.close()
    assert b"".join(d for _, d in received) == payload
    intervals = radio.intervals()
    assert radio.bytes_sent == len(payload)
    assert radio.busy_seconds == pytest.approx(len(payload) * 8 / profile.rate_bps)  # 0.4 s on air
    assert all(b[0] >= a[1] - 1e-9 for a, b in zip(intervals, intervals[1:]))  # one radio: no overlap
    # Nothing reaches the broker before its last bit was on air and the latency passed (a lower bound only).
    assert received[-1][0] >= intervals[-1][1] + profile.latency_s


def test_radio_busy_time_reaches_the_emulated_power_model(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    radio = RadioLog()
    truth_path = tmp_path / "truth.csv"
    try:
        emulator = MeterEmulator(pid=sleeper.pid, link=tmp_path / "meter", board="pi4", seed=0, rate_hz=500,
                                 ground_truth=truth_path, tick_seconds=0.005, radio=radio, radio_power_w=2.0)
        with emulator:
            time.sleep(0.3)
            start, end = radio.transmit(1000, 0.4)
            while time.monotonic() < end + 0.3:
                time.sleep(0.05)
    finally:
        sleeper.kill()
        sleeper.wait()
    truth = read_ground_truth(truth_path)
    t, power = truth["host_monotonic_s"], truth["power_w"]
    on_air = (t > start + 0.01) & (t < end)
    quiet = (t < start - 0.01) | (t > end + 0.01)
    assert on_air.sum() > 50 and quiet.sum() > 50
    assert np.median(power[on_air]) - np.median(power[quiet]) == pytest.approx(2.0, abs=0.1)
    # The energy above the quiet level over the window is the radio's: 2 W x 0.4 s.
    dt = np.median(np.diff(t))
    extra = float(np.sum(power[(t >= start) & (t <= end + 0.01)] - np.median(power[quiet])) * dt)
    assert extra == pytest.approx(0.8, rel=0.1)


def test_meter_emulate_rejects_an_unknown_link_in_one_line(capsys):
    assert qfl(["meter", "emulate", "--pid", "1", "--link", "/tmp/x", "--net", "5g"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loopback, wifi, lte-m, kim2022" in err and "Traceback" not in err
