"""Hostile and repeated messages against a running basestation over a real broker with the ACL.

Device 0 is played by this test with device 0's own credentials; device 1 is
a light device (basestation.loadgen) that answers every plan. The round can
only close once device 0's genuine update arrives, which the test sends after
every attack, so all of them meet an open round.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from basestation.loadgen import LightDevice
from basestation.rounds import apply_update, quantize_model
from basestation.strategies import FedAvg
from edge.mqtt import BrokerSettings, Message, MqttLink, Topics, connect_blocking
from edge.runtime.messages import Ack, RoundPlan
from edge.wire import decode_message, dequantize, encode_update, model_hash, quantize_update, read_header


def settings(fed, device: str) -> BrokerSettings:
    entry = fed.credentials.devices[device]
    return BrokerSettings(fed.broker.url, username=entry.username, password=entry.password, protocol=fed.protocol,
                          reconnect_max=1.0)


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.normal(0, 0.01, (64, 32)).astype(np.float32), "0.bias": np.zeros(32, np.float32),
            "2.weight": rng.normal(0, 0.01, (32, 10)).astype(np.float32), "2.bias": np.zeros(10, np.float32)}


class Player:
    """Device 0, driven by the test: its own login, its own key, and whatever it chooses to publish."""

    def __init__(self, fed, index: int = 0):
        self.fed, self.device = fed, fed.devices[index]
        self.key = fed.credentials.devices[self.device].hmac_key
        self.topics = Topics(fed.experiment)
        self.link = MqttLink(settings(fed, self.device), f"player-{index}",
                             subscriptions=[(self.topics.round, 1), (self.topics.models, 1),
                                            (self.topics.device(self.device, "ack"), 1)])
        connect_blocking(self.link, 5)
        self.plan: RoundPlan | None = None
        self.bases: dict[int, bytes] = {}
        self.acks: list[Ack] = []

    def pump(self, until, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out waiting on the basestation"
            event = self.link.next_event(0.05)
            if not isinstance(event, Message) or not event.payload:
                continue
            kind, _, round_ = self.topics.parse(event.topic)
            if kind == "round":
                self.plan = RoundPlan.from_json(event.payload)
            elif kind == "model":
                self.bases[round_] = read_header(event.payload).base_hash
            elif kind == "ack":
                self.acks.append(Ack.from_json(event.payload))

    def wait_round(self, number: int) -> RoundPlan:
        self.pump(lambda: self.plan is not None and self.plan.round == number and number in self.bases)
        return self.plan

    def update(self, *, device: str | None = None, key: bytes | None = None, round_: int | None = None,
               base: bytes | None = None, seed: int = 0) -> bytes:
        plan = self.plan
        tensors = quantize_update(delta(seed), plan.m, np.random.default_rng(seed))
        return encode_update(tensors, experiment=self.fed.experiment, device=device or self.device,
                             round=plan.round if round_ is None else round_,
                             base_hash=self.bases[plan.round] if base is None else base, samples=50,
                             key=key or self.key)

    def publish(self, topic_device: str, data: bytes) -> int:
        info = self.link.publish(self.topics.device(topic_device, "update"), data)
        info.wait_for_publish(5)
        return info.mid


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_attacks_are_rejected_counted_and_leave_the_model_alone(federation, protocol: str) -> None:
    fed = federation(devices=2, protocol=protocol)
    victim = fed.devices[1]
    honest = LightDevice(settings(fed, victim), fed.experiment, victim, fed.credentials.devices[victim].hmac_key,
                         fed.credentials.model_public_key, delta=delta(7), samples=80).start()
    player = Player(fed)
    hole = MqttLink(BrokerSettings(fed.broker.url, username=fed.credentials.basestation_username,
                                   password=fed.credentials.basestation_password, protocol=protocol), "acl-hole")
    connect_blocking(hole, 5)
    try:
        with fed.basestation_thread(**{"rounds": 2, "keep_payloads": True, "round.quorum": 1.0,
                                       "round.deadline_seconds": 30.0,
                                       "round.report_wait_seconds": 0.5}) as station:
            player.link.publish(player.topics.device(player.device, "hello"),
                                _hello(player.device, fed.experiment, player.key), retain=True)
            player.link.publish(player.topics.device(player.device, "status"),
                                b'{"device":"%s","state":"online"}' % player.device.encode(), retain=True)
            plan = player.wait_round(1)
            # 1-2. Speaking for the victim on the victim's topic: the broker's ACL drops both (under MQTT 5 it
            # also tells the publisher; under 3.1.1 it acknowledges as if it had accepted).
            as_victim = player.publish(victim, player.update(device=victim, seed=1))
            own_on_victims_topic = player.publish(victim, player.update(seed=2))
            # The same two through a hole in the ACL (a login that may write anywhere): now the
            # basestation's own checks must stop them, the HMAC and the signed device id.
            hole.publish(player.topics.device(victim, "update"), player.update(device=victim, seed=1)
                         ).wait_for_publish(5)
            hole.publish(player.topics.device(victim, "update"), player.update(seed=2)).wait_for_publish(5)
            # 3. Forged: the player's id with a key that is not its own.
            player.publish(player.device, player.update(key=os.urandom(32), seed=3))
            # 4. Malformed: not the wire format at all, and a truncated genuine one.
            player.publish(player.device, b"\x00garbage" * 10)
            player.publish(player.device, player.update(seed=4)[:-40])
            # 5. Stale: signed correctly but for another round.
            player.publish(player.device, player.update(round_=plan.round + 5, seed=5))
            # 6. Relative to a model that is not this round's.
            player.publish(player.device, player.update(base=bytes(32), seed=6))
            # 7. An id without a key.
            player.publish(player.device, player.update(device="intruder", key=os.urandom(32), seed=8))
            # The genuine update, published twice (a redelivered duplicate): aggregated once.
            genuine = player.update(seed=9)
            player.publish(player.device, genuine)
            player.publish(player.device, genuine)
            player.wait_round(2)
            # 8. Replay of round 1's genuine update during round 2.
            player.publish(player.device, genuine)
            player.publish(player.device, player.update(seed=10))
            player.pump(lambda: station.finished, 30)
        with fed.store() as store:
            counts = store.rejection_counts(fed.experiment)
            # Through the hole: the victim's id signed with the player's key is forged; the player's own
            # signature on the victim's topic is on the wrong topic. The ACL-dropped copies never arrived.
            assert counts == {"forged": 2, "wrong_topic": 1, "malformed": 2, "stale_round": 1, "wrong_base": 1,
                              "unknown_device": 1, "replayed": 2}
            if protocol == "5":
                assert "Not authorized" in player.link.refused_publishes[as_victim]
                assert "Not authorized" in player.link.refused_publishes[own_on_victims_topic]
            else:
                assert player.link.refused_publishes == {}
            rounds = store.rounds(fed.experiment)
            assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 2), ("aggregated", 2)]
            assert sorted(u.device for u in store.updates(fed.experiment, 1)) == fed.devices
            # The model moved by exactly the two genuine updates of round 1.
            _, start = store.model(fed.experiment, 1)
            results = [(dequantize(decode_message(p).tensors), u.samples)
                       for u, p in store.update_payloads(fed.experiment, 1)]
            expected_model = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(1, results))
            assert store.model(fed.experiment, 2)[0] == model_hash(expected_model).hex()
        statuses = [(a.round, a.status) for a in player.acks if a.kind == "update"]
        assert statuses.count((1, "accepted")) == 1 and statuses.count((1, "duplicate")) == 2
        assert (plan.round + 5, "rejected") in statuses
    finally:
        hole.stop()
        player.link.stop()
        honest.stop()


def _hello(device: str, experiment: str, key: bytes) -> bytes:
    from edge.runtime.messages import sign_json

    return sign_json({"kind": "hello", "device": device, "experiment": experiment, "dataset_size": 50,
                      "board": "test", "meter_id": None, "software": "test", "protocol": "5",
                      "sent_at": time.time(), "nonce": os.urandom(8).hex()}, key)
