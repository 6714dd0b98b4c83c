"""Federation end to end: edge and basestation processes over a real Mosquitto with per-device logins."""

from __future__ import annotations

import json
import signal

import pytest


def test_bad_configs_are_one_clear_line(federation, spawn, qfl_command) -> None:
    """qfl edge/basestation reject a bad config with one clear line and exit status 2."""
    fed = federation(devices=1)
    bad = fed.root / "bad.toml"
    bad.write_text('device_id = "dev 1"\n')
    proc = spawn([*qfl_command, "edge", "run", "--config", str(bad)], name="bad-edge")
    assert proc.wait(30) == 2
    assert "device_id must be 1-64 characters" in proc.log_path.read_text()
    proc = fed.start_basestation(**{"training.strategy": "krum"})
    assert proc.wait(30) == 2
    assert "unknown strategy 'krum'" in proc.log_path.read_text()


@pytest.mark.slow
def test_four_edges_complete_five_rounds(federation) -> None:
    fed = federation(devices=4)
    edges = [fed.start_edge(i) for i in range(4)]
    bs = fed.start_basestation()
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    for edge in edges:  # the finished plan ends every device by itself
        assert edge.wait(30) == 0, edge.log_path.read_text()[-3000:]
    with fed.store() as store:
        rounds = store.rounds("exp1")
        assert [(r.round, r.status, len(r.selected)) for r in rounds] == [(k, "aggregated", 4) for k in range(1, 6)]
        accuracy = [r.accuracy for r in rounds]
        assert accuracy[-1] > accuracy[0] + 0.1 and accuracy[-1] > 0.5, accuracy
        updates = store.updates("exp1")
        assert sorted((u.round, u.device) for u in updates) == sorted(
            (r, d) for r in range(1, 6) for d in fed.devices)
        assert all(u.status == "aggregated" and not u.has_payload for u in updates)
        reports = store.energy_reports("exp1")
        assert sorted((e["round"], e["device"]) for e in reports) == sorted(
            (r, d) for r in range(1, 6) for d in fed.devices)
        assert all(e["meter"] is None and e["n"] == 8 and e["iterations"] == 20 for e in reports)
        assert [d.device for d in store.devices("exp1")] == fed.devices
        assert [d.policy for d in store.decisions("exp1")] == ["fixed"] * 5
        assert store.rejection_counts("exp1") == {}
        assert store.experiment("exp1").status == "finished"
    status = json.loads(fed.status_path.read_text())
    assert status["state"] == "finished" and status["rounds_aggregated"] == 5 and status["updates"] == 20
    for dev in fed.devices:  # every update and report was acknowledged, so every spool is empty
        assert not list((fed.root / "spool" / dev).glob("*.msg"))


@pytest.mark.slow
def test_edge_with_an_emulated_meter_reports_measured_energy(federation, spawn, qfl_command) -> None:
    fed = federation(devices=1, **{"rounds": 2, "training.iterations": 400})
    link = fed.root / "meter0"
    edge = fed.start_edge(0, meter_port=str(link), meter_idle_seconds=0.3)
    meter = spawn([*qfl_command, "meter", "emulate", "--pid", str(edge.pid), "--board", "pi4", "--link", str(link),
                   "--seed", "0"], name="meter0")
    bs = fed.start_basestation()
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    assert edge.wait(30) == 0, edge.log_path.read_text()[-3000:]
    assert meter.wait(30) == 0  # the emulator ends with the process it watches
    with fed.store() as store:
        energy = store.energy(fed.experiment)
        assert sorted((e.round, e.phase) for e in energy) == [(1, "train"), (1, "uplink"), (2, "train"),
                                                              (2, "uplink")]
        for e in energy:  # an uplink can be shorter than one sample interval: interpolated, still positive
            assert e.joules > 0 and e.seconds > 0 and e.partial is False
        train = [e for e in energy if e.phase == "train"]
        assert all(e.samples > 0 and e.joules_above_idle > 0 for e in train)  # training burns more than idling
        report = store.energy_report(fed.experiment, fed.devices[0], 1)
        assert report["meter"]["id"] and report["meter"]["health"]["state"] == "streaming"
        assert report["meter"]["health"]["counters"]["samples"] > 0
        assert {d.meter_id for d in store.devices(fed.experiment)} == {report["meter"]["id"]}


@pytest.mark.slow
def test_sigterm_stops_edges_and_basestation_cleanly(federation) -> None:
    fed = federation(devices=2, **{"rounds": 0, "round.min_online": 1, "round.deadline_seconds": 2.0,
                                   "round.quorum": 0.5})
    edges = [fed.start_edge(i) for i in range(2)]
    bs = fed.start_basestation()
    fed.wait_until(lambda: len(fed.rounds(status="aggregated")) >= 2, 60, "two rounds", (bs, *edges))
    edges[1].send_signal(signal.SIGTERM)
    assert edges[1].wait(20) == 0
    fed.wait_until(lambda: fed.read(lambda s: {d.device: d.state for d in s.devices(fed.experiment)})[
        fed.devices[1]] == "offline", 20, "the stopped device to say it is offline", (bs,))
    bs.send_signal(signal.SIGTERM)
    assert bs.wait(20) == 0, bs.log_path.read_text()[-3000:]
    status = json.loads(fed.status_path.read_text())
    assert status["state"] == "stopped" and status["rounds_aggregated"] >= 2
    assert fed.read(lambda s: s.experiment(fed.experiment).status) == "stopped"
    # Started again, the basestation resumes the same experiment and the rounds go on from where they were.
    done = status["rounds_aggregated"]
    bs = fed.start_basestation(rounds=done + 2)
    assert bs.wait(60) == 0, bs.log_path.read_text()[-3000:]
    rounds = fed.rounds()
    assert len([r for r in rounds if r.status == "aggregated"]) == done + 2
    assert [r.round for r in rounds] == list(range(1, len(rounds) + 1))
    assert edges[0].wait(30) == 0  # the finished plan ends the device still running


@pytest.mark.slow
def test_measured_policy_decides_every_round_from_the_meters(federation, spawn, qfl_command) -> None:
    fed = federation(devices=2, **{"rounds": 4, "training.iterations": 20, "precision.policy": "measured-fit",
                                   "precision.n": 8, "precision.m": 8})
    edges = []
    for i in range(2):
        link = fed.root / f"meter{i}"
        edges.append(fed.start_edge(i, meter_port=str(link), meter_idle_seconds=0.3))
        spawn([*qfl_command, "meter", "emulate", "--pid", str(edges[-1].pid), "--link", str(link), "--seed", str(i)],
              name=f"meter{i}")
    bs = fed.start_basestation()
    assert bs.wait(180) == 0, bs.log_path.read_text()[-3000:]
    with fed.store() as store:
        decisions = store.decisions(fed.experiment)
        rounds = store.rounds(fed.experiment)
        assert [d.policy for d in decisions] == ["measured-fit"] * 4
        assert [(d.round, d.n, d.m) for d in decisions] == [(r.round, r.n, r.m) for r in rounds]
        assert all(d.inputs["round"] == d.round and "calibration" in d.inputs for d in decisions)
        assert decisions[-1].inputs["records"] == 6  # every metered report of rounds 1-3 went into round 4's choice
        assert [c[0] for c in store.calibrations(fed.experiment)] == [1, 2, 3, 4]
        for r in rounds:
            plan = store.plan(fed.experiment, r.round)
            assert (plan["n"], plan["m"]) == (r.n, r.m)
