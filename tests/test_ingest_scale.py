"""Ingest through MQTT 5 shared subscriptions: two workers split the updates, each aggregated exactly once."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from basestation.broker import Broker
from basestation.strategies import FedAvg
from edge.mqtt import Topics
from edge.wire import dequantize, encode_update, model_hash, quantize_update
from firmware_tools.credentials import Credentials

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs the mosquitto broker")]


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "ingest_scale.py"
    spec = importlib.util.spec_from_file_location("ingest_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_two_shared_subscribers_aggregate_every_update_once(tmp_path: Path) -> None:
    bench = _bench()
    rng = np.random.default_rng(5)
    creds = Credentials(bench.EXP, "basestation", rng.bytes(8).hex(), rng.bytes(32))
    devices = [f"d{i:03d}" for i in range(40)]
    keys = {d: rng.bytes(32) for d in devices}
    reference = {"w": np.zeros((50, 20), np.float32)}
    base = model_hash(reference)
    topics = Topics(bench.EXP)
    payloads, deltas = [], []
    for i, d in enumerate(devices):
        tensors = quantize_update({"w": rng.normal(0, 0.01, (50, 20)).astype(np.float32)}, 8, rng)
        payloads.append((topics.device(d, "update"), encode_update(tensors, experiment=bench.EXP, device=d, round=1,
                                                                   base_hash=base, samples=10 + i, key=keys[d])))
        deltas.append((dequantize(tensors), 10 + i))
    expected = FedAvg().aggregate(1, deltas)
    with Broker(tmp_path / "broker", accounts=creds.accounts(), experiment=bench.EXP) as broker:
        row = bench.measure(broker, creds, 2, payloads, keys, base, expected)
    assert row["aggregated"] == row["distinct"] == len(devices)
    assert sum(row["per_worker"]) == len(devices) and min(row["per_worker"]) > 0  # both workers took a share
    assert row["same_as_one_process"]
