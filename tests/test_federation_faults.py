"""Faults during a federation: a device killed mid-round, broker restarts, the basestation killed and resumed.

Rounds here train long enough (thousands of local iterations, about a second)
that "mid-round" is a state the test can observe in the store and act in.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from basestation.rounds import apply_update, quantize_model
from basestation.strategies import FedAvg
from edge.wire import decode_message, dequantize, model_hash

LONG = 8000  # local iterations: roughly a second of training per round on this machine


def updates_of(fed, round_: int) -> list[str]:
    if not fed.store_path.exists():
        return []
    with fed.store() as store:
        return sorted(u.device for u in store.updates(fed.experiment, round_))


def open_round(fed) -> int | None:
    rounds = fed.rounds(status="open")
    return rounds[-1].round if rounds else None


@pytest.mark.slow
def test_dropout_closes_at_deadline_with_quorum_and_device_rejoins(federation) -> None:
    fed = federation(devices=4, **{"rounds": 6, "training.iterations": LONG, "round.deadline_seconds": 4.0,
                                   "round.extensions": 0})
    edges = [fed.start_edge(i) for i in range(4)]
    bs = fed.start_basestation()
    victim = fed.devices[3]
    fed.wait_until(lambda: open_round(fed) == 2, 60, "round 2 to open", (bs, *edges))
    edges[3].send_signal(signal.SIGKILL)  # mid-round: it is training
    edges[3].wait(10)
    assert victim not in updates_of(fed, 2)

    def offline() -> bool:
        with fed.store() as store:
            return {d.device: d.state for d in store.devices(fed.experiment)}[victim] == "offline"

    fed.wait_until(offline, 20, "the will to mark the killed device offline", (bs,))
    fed.wait_until(lambda: bool(fed.rounds(status="aggregated")[1:2]), 30, "round 2 to close", (bs,))
    second = fed.rounds()[1]
    assert second.status == "aggregated" and second.quorum == 3 and victim in second.selected
    assert updates_of(fed, 2) == fed.devices[:3]
    fed.wait_until(lambda: open_round(fed) == 3, 30, "round 3 to open", (bs,))
    assert victim not in fed.rounds()[2].selected  # offline devices are not asked
    edges[3] = fed.start_edge(3)  # the device comes back (same spool and state)
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    rejoined = [r.round for r in fed.rounds() if victim in updates_of(fed, r.round)]
    assert rejoined[0] == 1 and any(r >= 3 for r in rejoined), rejoined
    assert [r.status for r in fed.rounds()] == ["aggregated"] * 6


@pytest.mark.slow
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_broker_restart_mid_round_loses_no_update(federation, kill: bool) -> None:
    fed = federation(devices=4, **{"rounds": 4, "training.iterations": LONG // 2, "round.deadline_seconds": 60.0})
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
    with fed.store() as store:
        assert len(store.energy_reports(fed.experiment)) == 16
        assert set(store.rejection_counts(fed.experiment)) <= {"replayed"}  # re-sent copies only


@pytest.mark.slow
def test_basestation_killed_mid_round_resumes_without_double_counting(federation) -> None:
    fed = federation(devices=4, **{"rounds": 3, "keep_payloads": True, "training.iterations": LONG,
                                   "round.deadline_seconds": 60.0})
    edges = [fed.start_edge(i) for i in range(4)]
    bs = fed.start_basestation()
    fed.wait_until(lambda: open_round(fed) == 2, 60, "round 2 to open", (bs, *edges))
    edges[3].send_signal(signal.SIGSTOP)  # frozen mid-training: still connected, still selected
    try:
        fed.wait_until(lambda: len(updates_of(fed, 2)) == 3, 60, "three updates of round 2", (bs, *edges))
        bs.send_signal(signal.SIGKILL)
        bs.wait(10)
        bs = fed.start_basestation()
        fed.wait_until(lambda: "already stored" in bs.log_path.read_text(), 60, "the basestation to resume", (bs,))
    finally:
        edges[3].send_signal(signal.SIGCONT)
    assert bs.wait(120) == 0, bs.log_path.read_text()[-3000:]
    assert "round 2 is open with 3 of 4 updates already stored" in bs.log_path.read_text()
    with fed.store() as store:
        rounds = store.rounds(fed.experiment)
        assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 4)] * 3
        # Recompute round 2 from the stored payloads: each update counted exactly once.
        _, start = store.model(fed.experiment, 2)
        payloads = store.update_payloads(fed.experiment, 2)
        assert sorted(u.device for u, _ in payloads) == fed.devices
        results = [(dequantize(decode_message(p).tensors), u.samples) for u, p in payloads]
        expected = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(2, results))
        result_hash, result = store.model(fed.experiment, 3)
        assert result_hash == model_hash(expected).hex() == rounds[1].result_hash
        doubled = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(2, results + results[:1]))
        assert model_hash(doubled).hex() != result_hash
        np.testing.assert_array_equal(result["0.bias"], expected["0.bias"])
    for edge in edges:
        assert edge.wait(30) == 0


@pytest.mark.slow
def test_edge_restart_resends_its_unacknowledged_update(federation) -> None:
    fed = federation(devices=2, **{"rounds": 2, "training.iterations": LONG // 4, "round.deadline_seconds": 60.0})
    edges = [fed.start_edge(i) for i in range(2)]
    bs = fed.start_basestation()
    fed.wait_until(lambda: open_round(fed) == 1, 60, "round 1 to open", (bs, *edges))
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
