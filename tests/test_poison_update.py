"""The exp-127 attack (issue 14): one validly signed update that used to take the basestation down.

Device 0, played by the test with its own key, sends 1-bit codes with scale
exponent 127 (about 1.7e38 per weight) and samples = 2**32 - 1. The
basestation runs as a real ``qfl basestation serve`` process over a real
Mosquitto with the ACL and a real SQLite store. It must refuse the update with
a reason, finish the run, and a restart with such an update already stored
(as an earlier version accepted it) must not crash either.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import time

import numpy as np
import pytest

from basestation.loadgen import LightDevice
from basestation.store import Store
from edge.wire import QuantizedTensor, encode_update
from test_federation_security import Player, _hello, delta, settings

SHAPES = {"0.weight": (64, 32), "0.bias": (32,), "2.weight": (32, 10), "2.bias": (10,)}


def poison(player: Player, round_: int, base: bytes) -> bytes:
    """The attack: every tensor 1-bit code 0 (= +2**127), samples 2**32 - 1, signed with the device's key."""
    tensors = [QuantizedTensor(name, shape, 1, 127, "stochastic", np.zeros(math.prod(shape), np.int8))
               for name, shape in SHAPES.items()]
    return encode_update(tensors, experiment=player.fed.experiment, device=player.device, round=round_,
                         base_hash=base, samples=2**32 - 1, key=player.key)


def greet(player: Player) -> None:
    player.link.publish(player.topics.device(player.device, "hello"),
                        _hello(player.device, player.fed.experiment, player.key), retain=True)
    player.link.publish(player.topics.device(player.device, "status"),
                        b'{"device":"%s","state":"online"}' % player.device.encode(), retain=True)


def integrity(path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
def test_exp127_update_is_refused_and_the_run_finishes(federation) -> None:
    fed = federation(devices=2)
    victim = fed.devices[1]
    honest = LightDevice(settings(fed, victim), fed.experiment, victim, fed.credentials.devices[victim].hmac_key,
                         fed.credentials.model_public_key, delta=delta(7), samples=80).start()
    player = Player(fed)
    try:
        greet(player)
        bs = fed.start_basestation(**{"rounds": 2, "round.quorum": 1.0, "round.deadline_seconds": 30.0,
                                      "round.report_wait_seconds": 0.5})
        plan = player.wait_round(1)
        player.publish(player.device, poison(player, plan.round, player.bases[plan.round]))
        player.pump(lambda: any(a.status == "rejected" for a in player.acks))
        player.publish(player.device, player.update(seed=9))
        player.wait_round(2)
        player.publish(player.device, player.update(seed=10))
        assert bs.wait(60) == 0, bs.log_path.read_text()[-3000:]
        assert "Traceback" not in bs.log_path.read_text()
        rejected = [a for a in player.acks if a.status == "rejected"]
        assert [(a.round, a.reason) for a in rejected] == [(1, "out_of_bounds")]
        with fed.store() as store:
            reasons = [(r.reason, r.device) for r in store.rejections(fed.experiment)]
            assert reasons == [("out_of_bounds", player.device)]
            detail = store.rejections(fed.experiment)[0].detail
            assert "samples" in detail and str(2**32 - 1) in detail
            rounds = store.rounds(fed.experiment)
            assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 2), ("aggregated", 2)]
            assert all(math.isfinite(r.loss) and 0 <= r.accuracy <= 1 for r in rounds)
            assert all(u.samples in (50, 80) for u in store.updates(fed.experiment))
        assert integrity(fed.store_path) == "ok"
    finally:
        player.link.stop()
        honest.stop()


@pytest.mark.slow
def test_restart_with_a_poisoned_update_already_stored_does_not_crash(federation) -> None:
    fed = federation(devices=2)
    victim = fed.devices[1]
    honest = LightDevice(settings(fed, victim), fed.experiment, victim, fed.credentials.devices[victim].hmac_key,
                         fed.credentials.model_public_key, delta=delta(7), samples=80).start()
    player = Player(fed)
    options = {"rounds": 1, "keep_payloads": True, "round.quorum": 0.5, "round.deadline_seconds": 8.0,
               "round.extensions": 0, "round.report_wait_seconds": 0.5}
    try:
        greet(player)
        bs = fed.start_basestation(**options)
        plan = player.wait_round(1)
        fed.wait_until(lambda: fed.read(lambda s: len(s.updates(fed.experiment, 1)), 0) == 1, 30,
                       "the honest update", (bs,))
        bs.send_signal(signal.SIGTERM)
        assert bs.wait(20) == 0
        # What a basestation before this fix stored: the attack, accepted, in the open round.
        data = poison(player, plan.round, player.bases[plan.round])
        with Store(fed.store_path) as store:
            assert store.add_update(fed.experiment, device=player.device, round_=1, nonce=os.urandom(16).hex(),
                                    digest=data[-32:].hex(), samples=2**32 - 1, size=len(data), m=1, payload=data,
                                    now=time.time())
        restarted = fed.start_basestation(**options)
        assert restarted.wait(60) == 0, restarted.log_path.read_text()[-3000:]
        assert "Traceback" not in restarted.log_path.read_text()
        with fed.store() as store:
            (round1,) = store.rounds(fed.experiment)
            assert round1.status == "aggregated" and math.isfinite(round1.loss)
            states = {u.device: u.status for u in store.updates(fed.experiment, 1)}
            assert states == {player.device: "dropped", victim: "aggregated"}
            drops = [r for r in store.rejections(fed.experiment) if r.reason == "out_of_bounds"]
            assert [(r.device, r.round) for r in drops] == [(player.device, 1)]
        assert integrity(fed.store_path) == "ok"
    finally:
        player.link.stop()
        honest.stop()


@pytest.mark.slow
def test_restart_with_a_retained_poison_on_the_broker(federation) -> None:
    """A device retains the attack on its update topic while the basestation is down; the restarted one
    refuses it (reason ``retained``), deletes it from the broker, and finishes the run."""
    from edge.mqtt import BrokerSettings, MqttLink, connect_blocking

    fed = federation(devices=2)
    victim = fed.devices[1]
    honest = LightDevice(settings(fed, victim), fed.experiment, victim, fed.credentials.devices[victim].hmac_key,
                         fed.credentials.model_public_key, delta=delta(7), samples=80).start()
    player = Player(fed)
    options = {"rounds": 1, "round.quorum": 1.0, "round.deadline_seconds": 30.0, "round.report_wait_seconds": 0.5}
    try:
        greet(player)
        bs = fed.start_basestation(**options)
        plan = player.wait_round(1)
        bs.send_signal(signal.SIGTERM)
        assert bs.wait(20) == 0
        topic = player.topics.device(player.device, "update")
        player.link.publish(topic, poison(player, plan.round, player.bases[plan.round]), retain=True
                            ).wait_for_publish(5)
        restarted = fed.start_basestation(**options)
        fed.wait_until(lambda: "retained" in fed.read(lambda s: s.rejection_counts(fed.experiment), {}), 30,
                       "the retained poison to be refused", (restarted,))
        player.publish(player.device, player.update(seed=9))
        assert restarted.wait(60) == 0, restarted.log_path.read_text()[-3000:]
        assert "Traceback" not in restarted.log_path.read_text()
        with fed.store() as store:
            # The copy queued in the basestation's persistent session arrives as a live message and meets the
            # bounds; the copy the broker retained meets the retained check.
            counts = store.rejection_counts(fed.experiment)
            # QoS 1 redeliveries of the same poison (0-2 seen, depending on when the restart cut the session's
            # PUBACKs) are refused as replays; no other reason may appear, and none of them is accepted.
            assert {k: v for k, v in counts.items() if k != "replayed"} == {"retained": 1, "out_of_bounds": 1}
            (round1,) = store.rounds(fed.experiment)
            assert (round1.status, round1.accepted) == ("aggregated", 2) and math.isfinite(round1.loss)
        # The broker no longer holds it: a new subscriber is handed nothing retained on that topic.
        watcher = MqttLink(BrokerSettings(fed.broker.url, username=fed.credentials.basestation_username,
                                          password=fed.credentials.basestation_password), "watcher",
                           subscriptions=[(topic, 1)])
        connect_blocking(watcher, 5)
        try:
            seen = [watcher.next_event(0.5) for _ in range(4)]
            assert not [e for e in seen if getattr(e, "payload", b"")]
        finally:
            watcher.stop()
        assert integrity(fed.store_path) == "ok"
    finally:
        player.link.stop()
        honest.stop()
