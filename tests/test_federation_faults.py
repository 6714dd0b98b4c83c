"""Faults during a federation: a device killed mid-round, broker restarts, the basestation killed and resumed.

"Mid-round" is made a state the test can hold, not a race it hopes to win: a
device frozen with SIGSTOP stays connected (so it is online and selected) but
cannot answer, and a deadline far away keeps a round open until the test acts.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from basestation.rounds import apply_update, quantize_model
from basestation.strategies import FedAvg
from edge.wire import decode_message, dequantize, model_hash

LONG = 8000  # local iterations: roughly a second of training per round on this machine


def updates_of(fed, round_: int) -> list[str]:
    return fed.read(lambda store: sorted(u.device for u in store.updates(fed.experiment, round_)), [])


def open_round(fed) -> int | None:
    rounds = fed.rounds(status="open")
    return rounds[-1].round if rounds else None


def device_state(fed, device: str) -> str | None:
    return fed.read(lambda store: {d.device: d.state for d in store.devices(fed.experiment)}.get(device))


@pytest.mark.slow
def test_dropout_closes_at_deadline_with_quorum_and_device_rejoins(federation) -> None:
    # min_online = 4: after the dropout, the next round waits until the device is back.
    fed = federation(devices=4, **{"rounds": 3, "round.deadline_seconds": 5.0, "round.extensions": 0,
                                   "round.min_online": 4})
    victim = fed.devices[3]
    bs = fed.start_basestation()
    edges = {3: fed.start_edge(3)}
    fed.wait_until(lambda: device_state(fed, victim) == "online", 60, "the victim to come online", (bs, edges[3]))
    edges[3].send_signal(signal.SIGSTOP)  # connected and selected, but it will never answer round 1
    edges.update({i: fed.start_edge(i) for i in range(3)})
    fed.wait_until(lambda: open_round(fed) == 1, 60, "round 1 to open", (bs, *edges.values()))
    assert victim in fed.rounds()[0].selected
    edges[3].send_signal(signal.SIGKILL)  # killed mid-round
    edges[3].wait(10)
    fed.wait_until(lambda: device_state(fed, victim) == "offline", 20, "the will to mark the victim offline", (bs,))
    fed.wait_until(lambda: bool(fed.rounds(status="aggregated")), 30, "round 1 to close", (bs,))
    first = fed.rounds()[0]
    assert (first.status, first.accepted, first.quorum, first.extensions) == ("aggregated", 3, 3, 0)
    assert first.closed_at >= first.deadline  # it waited for the deadline, then the quorum sufficed
    assert updates_of(fed, 1) == fed.devices[:3]
    assert open_round(fed) is None  # three online devices are too few for round 2
    edges[3] = fed.start_edge(3)  # the device comes back, with the same spool and state
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    assert [(r.status, r.accepted) for r in fed.rounds()] == [("aggregated", 3), ("aggregated", 4), ("aggregated", 4)]
    assert victim in updates_of(fed, 2) and victim in updates_of(fed, 3)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_broker_restart_mid_round_loses_no_update(federation, kill: bool) -> None:
    fed = federation(devices=4, **{"rounds": 4, "training.iterations": LONG // 4, "round.deadline_seconds": 60.0})
    edges = [fed.start_edge(i) for i in range(4)]
    bs = fed.start_basestation()
    fed.wait_until(lambda: open_round(fed) == 2, 60, "round 2 to open", (bs, *edges))
    fed.broker.restart(kill=kill)
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    # The deadline is far away, so every round closed because every selected device answered: nothing was
    # lost. (A device still reconnecting when a round opens counts as offline and is not selected.)
    rounds = fed.rounds()
    assert [r.status for r in rounds] == ["aggregated"] * 4
    assert all(r.accepted == len(r.selected) for r in rounds)
    assert rounds[1].accepted == 4  # the round the restart hit
    for i, edge in enumerate(edges):
        assert edge.wait(30) == 0
        assert not list((fed.root / "spool" / fed.devices[i]).glob("*.msg")), "an update was never acknowledged"
    with fed.store() as store:  # one energy report per update, none lost either
        reports = {(e["round"], e["device"]) for e in store.energy_reports(fed.experiment)}
        assert reports == {(u.round, u.device) for u in store.updates(fed.experiment)}
        assert set(store.rejection_counts(fed.experiment)) <= {"replayed"}  # re-sent copies only


@pytest.mark.slow
def test_basestation_killed_mid_round_resumes_without_double_counting(federation) -> None:
    fed = federation(devices=4, **{"rounds": 3, "keep_payloads": True, "round.deadline_seconds": 60.0,
                                   "round.min_online": 4})
    bs = fed.start_basestation()
    edges = {3: fed.start_edge(3)}
    fed.wait_until(lambda: device_state(fed, fed.devices[3]) == "online", 60, "device 3 to come online",
                   (bs, edges[3]))
    edges[3].send_signal(signal.SIGSTOP)  # frozen: still connected and selected, silent for now
    try:
        edges.update({i: fed.start_edge(i) for i in range(3)})
        fed.wait_until(lambda: len(updates_of(fed, 1)) == 3, 60, "three updates of round 1", (bs, *edges.values()))
        bs.send_signal(signal.SIGKILL)
        bs.wait(10)
        bs = fed.start_basestation()
        fed.wait_until(lambda: "already stored" in bs.log_path.read_text(), 60, "the basestation to resume", (bs,))
    finally:
        edges[3].send_signal(signal.SIGCONT)
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    assert "round 1 is open with 3 of 4 updates already stored" in bs.log_path.read_text()
    with fed.store() as store:
        rounds = store.rounds(fed.experiment)
        assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 4)] * 3
        # Recompute round 1 from the stored payloads: each update counted exactly once.
        _, start = store.model(fed.experiment, 1)
        payloads = store.update_payloads(fed.experiment, 1)
        assert sorted(u.device for u, _ in payloads) == fed.devices
        results = [(dequantize(decode_message(p).tensors), u.samples) for u, p in payloads]
        expected = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(1, results))
        result_hash, result = store.model(fed.experiment, 2)
        assert result_hash == model_hash(expected).hex() == rounds[0].result_hash
        doubled = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(1, results + results[:1]))
        assert model_hash(doubled).hex() != result_hash
        np.testing.assert_array_equal(result["0.bias"], expected["0.bias"])
    for edge in edges.values():
        assert edge.wait(30) == 0


@pytest.mark.slow
def test_edge_restart_resends_its_unacknowledged_update(federation) -> None:
    fed = federation(devices=2, **{"rounds": 2, "training.iterations": LONG, "round.deadline_seconds": 60.0,
                                   "round.min_online": 2})
    edges = [fed.start_edge(i) for i in range(2)]
    bs = fed.start_basestation()
    fed.wait_until(lambda: open_round(fed) == 1, 60, "round 1 to open", (bs, *edges))
    # Stop it only once device 0 has the plan and model: SIGSTOP freezes paho's network thread too, and
    # under load it could otherwise freeze the basestation before the plan left it.
    fed.wait_until(lambda: "round 1: training" in edges[0].log_path.read_text(), 60, "device 0 to start round 1",
                   (bs, edges[0]))
    bs.send_signal(signal.SIGSTOP)  # no acks for now
    spool = fed.root / "spool" / fed.devices[0]
    try:
        fed.wait_until(lambda: len(list(spool.glob("*.msg"))) == 2, 30, "device 0 to spool its update and report",
                       (edges[0],))
        edges[0].send_signal(signal.SIGKILL)
        edges[0].wait(10)
    finally:
        bs.send_signal(signal.SIGCONT)
    edges[0] = fed.start_edge(0)
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    assert edges[0].wait(30) == 0
    assert "re-sent 2 unacknowledged message(s) from the spool" in edges[0].log_path.read_text()
    assert not list(spool.glob("*.msg"))
    rounds = fed.rounds()
    assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 2)] * 2
    assert updates_of(fed, 1) == fed.devices


@pytest.mark.slow
def test_messages_lost_with_the_brokers_state_are_sent_again(federation) -> None:
    """The broker is killed, and so forgets the basestation's session, while the basestation is frozen and the
    device trains. The device publishes into a broker where nobody is subscribed; when the basestation comes
    back to a fresh session it changes the plan's sync token, and the device re-sends what was lost."""
    fed = federation(devices=1, **{"rounds": 1, "round.deadline_seconds": 60.0, "training.iterations": 3 * LONG})
    edge = fed.start_edge(0, resend_seconds=300.0)
    bs = fed.start_basestation()
    fed.wait_until(lambda: "round 1: training" in edge.log_path.read_text(), 60, "round 1 to start", (bs, edge))
    bs.send_signal(signal.SIGSTOP)
    spool = fed.root / "spool" / fed.devices[0]
    try:
        fed.broker.kill()
        fed.broker.start()
        fed.wait_until(lambda: len(list(spool.glob("*.msg"))) == 2, 60, "the device to publish into the void",
                       (edge,))
        assert edge.log_path.read_text().count("connected to") == 2  # it published after reconnecting
    finally:
        bs.send_signal(signal.SIGCONT)
    assert bs.wait(60) == 0, bs.log_path.read_text()[-3000:]
    assert edge.wait(30) == 0
    assert "for a basestation that lost its session" in edge.log_path.read_text()
    assert [(r.status, r.accepted) for r in fed.rounds()] == [("aggregated", 1)]
    assert not list(spool.glob("*.msg"))
