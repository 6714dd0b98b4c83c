"""The basestation's ingest workers (``ingest_workers = N``): a real Mosquitto, a real store, light devices.

Workers check and decode updates in their own processes on an MQTT shared
subscription and PUBACK each only once the service has stored it. Checked
here: the split verification gives the same verdicts as the whole one; the
workers share the stream and every update is aggregated exactly once; a
worker killed with SIGKILL mid-round is restarted and neither loses nor
doubles an update.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from typing import Iterator

import numpy as np
import pytest

from basestation.loadgen import LightDevice
from edge.wire import check_signed_update, encode_update, quantize_update, verify_update
from test_federation_security import delta, settings

ROUNDS = 3
RUN = {"rounds": ROUNDS, "round.quorum": 1.0, "round.deadline_seconds": 30.0, "round.report_wait_seconds": 0.5}


def test_split_verification_gives_the_verdicts_of_the_whole() -> None:
    key = b"k" * 32
    tensors = quantize_update({"w": np.linspace(-1, 1, 50, dtype=np.float32)}, 8, np.random.default_rng(0))
    good = encode_update(tensors, experiment="e1", device="pi-01", round=3, base_hash=bytes(32), samples=10, key=key)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    cases = [(good, 3, set()), (good, 4, set()), (forged, 3, set()), (good[:40], 3, set()), (good, None, set())]
    for data, round_, seen in cases:
        whole = verify_update(data, experiment="e1", round=round_, base_hash=bytes(32), key={"pi-01": key}.get,
                              seen_nonces=seen, sender="pi-01")
        first = check_signed_update(data, key={"pi-01": key}.get)
        split = verify_update(data, experiment="e1", round=round_, base_hash=bytes(32), key={"pi-01": key}.get,
                              seen_nonces=seen, sender="pi-01", checked=first)
        assert (split.reason, split.wire_reason) == (whole.reason, whole.wire_reason)
    assert {verify_update(good, experiment="e1", round=3, base_hash=bytes(32), key=key, seen_nonces=set(),
                          checked=check_signed_update(good, key=key)).reason} == {"ok"}


@contextlib.contextmanager
def _fleet(fed) -> Iterator[list[LightDevice]]:
    """One light device per device of ``fed``, stopped on exit."""
    fleet = [LightDevice(settings(fed, d), fed.experiment, d, fed.credentials.devices[d].hmac_key,
                         fed.credentials.model_public_key, delta=delta(i), samples=40 + i, seed=i).start()
             for i, d in enumerate(fed.devices)]
    try:
        yield fleet
    finally:
        for dev in fleet:
            dev.stop()


def _finished(fed, station, timeout: float) -> None:
    fed.wait_until(lambda: station.finished, timeout, f"{ROUNDS} aggregated rounds; workers received "
                   f"{station.workers.received}, restarts {station.workers.restarts}")


def _check_every_update_aggregated_once(fed) -> None:
    with fed.store() as store:
        rounds = store.rounds(fed.experiment, status="aggregated")
        updates = store.updates(fed.experiment)
        rejections = store.rejections(fed.experiment)
    assert len(rounds) == ROUNDS
    per_round = Counter((u.round, u.device) for u in updates)
    assert set(per_round.values()) == {1}, per_round  # one stored update per device and round
    assert {u.status for u in updates} == {"aggregated"}
    assert sorted(per_round) == sorted((r.round, d) for r in rounds for d in fed.devices)
    assert {r.reason for r in rejections} <= {"replayed"}, rejections  # a redelivery is refused, never stored


@pytest.mark.slow
def test_workers_share_the_updates_and_each_is_aggregated_once(federation) -> None:
    fed = federation(devices=6)
    with _fleet(fed), fed.basestation_thread(ingest_workers=2, **RUN) as station:
        _finished(fed, station, 120)
        received = list(station.workers.received)
        assert station.workers.restarts == 0
    _check_every_update_aggregated_once(fed)
    assert sum(received) == 6 * ROUNDS and min(received) > 0, received  # both members of the group got a share


@pytest.mark.slow
def test_a_worker_killed_mid_round_neither_loses_nor_doubles_an_update(federation) -> None:
    fed = federation(devices=6)
    with _fleet(fed) as fleet, fed.basestation_thread(ingest_workers=2, **RUN) as station:
        fed.wait_until(lambda: station.workers is not None and station.workers.received[0] >= 1, 60,
                       "worker 0's first update")
        victim = station.workers.pids()[0]
        os.kill(victim, signal.SIGKILL)
        fed.wait_until(lambda: station.workers.restarts >= 1 and station.workers.pids()[0] != victim, 30,
                       "the worker's restart")
        _finished(fed, station, 120)
    _check_every_update_aggregated_once(fed)
    assert all(dev.answered.keys() >= set(range(1, ROUNDS + 1)) for dev in fleet)
    assert sum(station.workers.received) >= 6 * ROUNDS  # what the dead worker held came again, to its successor
