"""The attack table of issue 14, rerun against a live basestation process (docs/security.md shows it).

One run: a real Mosquitto with the ACL, ``qfl basestation serve`` with a
real SQLite store, one honest light device, and device 0 played by the test
with only its own credentials (plus, for the rows that need it, a login
that may write anywhere: a hole in the ACL, to show the basestation's own
checks). Every row must be rejected with its reason, or be harmless: the
model ends as exactly the FedAvg of the genuine updates and the run ends
with status 0.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from basestation.loadgen import LightDevice
from basestation.rounds import apply_update, quantize_model
from basestation.strategies import FedAvg
from edge.mqtt import BrokerSettings, MqttLink, connect_blocking
from edge.runtime.messages import sign_json
from edge.wire import decode_message, dequantize, encode_model, encode_update, model_hash, quantize_update
from edge.wire import verify_model
from test_federation_security import Player, delta, settings
from test_poison_update import greet, integrity, poison


def energy(player: Player, round_: int, joules_above_idle: float) -> bytes:
    phases = {"train": {"joules": abs(joules_above_idle), "joules_above_idle": joules_above_idle, "seconds": 2.0}}
    return sign_json({"kind": "energy", "device": player.device, "experiment": player.fed.experiment,
                      "round": round_, "nonce": os.urandom(16).hex(), "n": 8, "m": 8, "iterations": 20,
                      "batch_size": 32, "lr": 0.2, "samples": 50, "train": {}, "uplink": {"bytes": 0},
                      "meter": {"board": "pi4", "phases": phases}, "sent_at": time.time()}, player.key)


@pytest.mark.slow
def test_every_attack_is_rejected_or_harmless(federation) -> None:
    fed = federation(devices=2)
    victim = fed.devices[1]
    honest = LightDevice(settings(fed, victim), fed.experiment, victim, fed.credentials.devices[victim].hmac_key,
                         fed.credentials.model_public_key, delta=delta(7), samples=80).start()
    player = Player(fed)
    hole = MqttLink(BrokerSettings(fed.broker.url, username=fed.credentials.basestation_username,
                                   password=fed.credentials.basestation_password), "acl-hole")
    connect_blocking(hole, 5)
    energy_topic = player.topics.device(player.device, "energy")
    try:
        greet(player)
        bs = fed.start_basestation(**{"rounds": 2, "keep_payloads": True, "round.quorum": 1.0,
                                      "round.deadline_seconds": 30.0, "round.report_wait_seconds": 0.5})
        plan = player.wait_round(1)
        base = player.bases[1]
        player.publish(player.device, player.update(key=os.urandom(32), seed=3))            # forged
        player.publish(player.device, player.update(seed=4)[:-40])                           # truncated
        big = quantize_update({**delta(5), "extra": np.zeros(500_000, np.float32)}, 32, None)
        player.publish(player.device, encode_update(big, experiment=fed.experiment, device=player.device,
                                                    round=1, base_hash=base, samples=50, key=player.key))  # oversize
        player.publish(player.device, player.update(round_=plan.round + 5, seed=5))          # stale
        player.publish(player.device, poison(player, 1, base))                                # exp-127 crash
        many = player.update(seed=6)
        tensors = decode_message(many).tensors
        player.publish(player.device, encode_update(tensors, experiment=fed.experiment, device=player.device,
                                                    round=1, base_hash=base, samples=2**32 - 1,
                                                    key=player.key))                         # samples 2^32-1
        # wrong topic, through the hole: the player's own signature on the victim's topic, for a later round
        hole.publish(player.topics.device(victim, "update"), player.update(round_=9, seed=7)).wait_for_publish(5)
        # retained poison on its own topic (live: meets the bounds; the broker's copy: docs/mqtt.md)
        player.link.publish(player.topics.device(player.device, "update"), poison(player, 1, base),
                            retain=True).wait_for_publish(5)
        # a global model made by a device, through the hole: signed with what a device holds
        forged_model = encode_model(quantize_update({"0.bias": np.ones(32, np.float32)}, 32, None),
                                    experiment=fed.experiment, round=1, key=fed.credentials.model_public_key)
        assert verify_model(forged_model, experiment=fed.experiment, key=fed.credentials.model_public_key,
                            round=1).reason == "forged"
        hole.publish(player.topics.model(1), forged_model, retain=True).wait_for_publish(5)
        for joules in (1e300, -1e9):                                                          # energy claims
            player.link.publish(energy_topic, energy(player, 1, joules)).wait_for_publish(5)
        genuine = player.update(seed=9)
        player.publish(player.device, genuine)
        player.wait_round(2)
        player.publish(player.device, genuine)                                                # replayed
        player.publish(player.device, player.update(seed=10))
        assert bs.wait(90) == 0, bs.log_path.read_text()[-3000:]
        assert "Traceback" not in bs.log_path.read_text()
        with fed.store() as store:
            counts = store.rejection_counts(fed.experiment)
            reasons = sorted((r.kind, r.reason) for r in store.rejections(fed.experiment))
            # forged; truncated -> malformed; oversize and stale; the poison twice (once retained);
            # samples; the wrong topic; two energy reports; the replay
            assert counts == {"forged": 1, "malformed": 1, "bad_shape": 1, "stale_round": 1, "out_of_bounds": 5,
                              "wrong_topic": 1, "replayed": 1}, reasons
            assert sum(r.kind == "energy" and r.reason == "out_of_bounds" for r in store.rejections(fed.experiment)) == 2
            rounds = store.rounds(fed.experiment)
            assert [(r.status, r.accepted) for r in rounds] == [("aggregated", 2), ("aggregated", 2)]
            assert all(math.isfinite(r.loss) for r in rounds)
            _, start = store.model(fed.experiment, 1)
            results = [(dequantize(decode_message(p).tensors), u.samples)
                       for u, p in store.update_payloads(fed.experiment, 1)]
            expected = apply_update(quantize_model("mlp", start, 8, "int"), FedAvg().aggregate(1, results))
            assert store.model(fed.experiment, 2)[0] == model_hash(expected).hex()
            assert {u.samples for u in store.updates(fed.experiment)} == {50, 80}
        assert integrity(fed.store_path) == "ok"
        # the honest device trained from the basestation's model, never from the forged one
        assert honest.model_hashes[1].hex() == plan.model_hash
    finally:
        hole.stop()
        player.link.stop()
        honest.stop()
