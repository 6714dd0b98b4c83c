"""Benchmark of the federation; prints one JSON object.

1. Round overhead without training: a basestation (in this process) and 20
   light devices (``basestation.loadgen``: real MQTT clients with their own
   logins that answer each plan with a precomputed digits-MLP update and an
   energy report) over a private Mosquitto with the ACL. A round's overhead
   is the time from opening one round to opening the next: plan and model
   out, 20 updates in, verification, store commits, acks, FedAvg,
   evaluation, next decision. Baseline, same run, same broker and clients:
   the bare MQTT fan-out/fan-in (one plan-sized message out, 20 update-sized
   replies back, no verification, store or aggregation). Goal: median < 300 ms.
2. Ingest throughput for 100,000-parameter 8-bit updates: verification,
   deduplication, store commit (synchronous=full, payload kept for resume),
   acks, FedAvg accumulation (``basestation.ingest`` exactly as the service
   runs it, without the network). Baselines: verification and decoding
   alone, and the same updates delivered through Mosquitto into the
   service's loop. Goal: >= 1,000 updates/s.
3. Ingest scaling: updates/s against 1, 2 and 4 worker processes on an
   MQTT 5 shared subscription (``bench/ingest_scale.py``, which also runs
   alone with more options), and the same through the service's own
   ``IngestWorkers`` and ``Ingest`` (store commit before each PUBACK) with 0
   (in the loop), 1, 2 and 4 workers. Goal: >= 0.7 of linear up to the core
   count.
4. The edge runtime's peak memory (VmHWM) on the digits MLP: ``qfl edge run``
   taking part in rounds, against ``python -c "import numpy, paho.mqtt"``
   measured the same way. Goal: <= 120 MB.

Run: ``.venv/bin/python bench/federation.py [--rounds R] [--updates N]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from basestation.broker import Broker
from basestation.config import BasestationConfig
from firmware_tools.credentials import Credentials, DeviceCredentials
from basestation.ingest import Ingest
from basestation.ingest_workers import Checked, IngestWorkers
from basestation.loadgen import LightDevice
from basestation.service import Basestation
from basestation.store import Store
from basestation.strategies import FedAvg
from edge.mqtt import BrokerSettings, Message, MqttLink, Topics, connect_blocking
from edge.wire import encode_update, model_hash, quantize_update, verify_update
from firmware_tools.provision import toml_text
from ingest_scale import scaling

EXP = "bench"
GOALS = {"round_overhead_ms": 300.0, "ingest_updates_per_s": 1000.0, "edge_peak_mb": 120.0}


def credentials(devices: list[str], seed: int = 0) -> Credentials:
    rng = np.random.default_rng(seed)
    creds = Credentials(EXP, "basestation", rng.bytes(8).hex(), rng.bytes(32))
    for dev in devices:
        creds.devices[dev] = DeviceCredentials(dev, rng.bytes(8).hex(), rng.bytes(32))
    return creds


def login(broker: Broker, creds: Credentials, device: str | None) -> BrokerSettings:
    if device is None:
        return BrokerSettings(broker.url, username=creds.basestation_username, password=creds.basestation_password)
    entry = creds.devices[device]
    return BrokerSettings(broker.url, username=entry.username, password=entry.password)


def basestation_config(root: Path, broker: Broker, creds_path: Path, **sections: dict) -> BasestationConfig:
    tables = {"broker": {"url": broker.url}, "round": {}, "training": {}, "precision": {"policy": "fixed"}}
    for name, values in sections.items():
        tables[name].update(values)
    path = root / "basestation.toml"
    path.write_text(toml_text({"experiment": EXP, "store": str(root / "bench.sqlite"), "credentials": str(creds_path),
                               "model": "mlp", "rounds": 0}, tables))
    return BasestationConfig.load(path)


# ---- 1. round overhead ----

def mlp_delta(seed: int) -> dict[str, np.ndarray]:
    from basestation.rounds import initial_model

    weights = initial_model("mlp", 0)
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}


def mqtt_floor(broker: Broker, creds: Credentials, devices: list[str], update_size: int, repeats: int) -> list[float]:
    """Seconds for one message to 20 clients and one update-sized reply from each, bare paho."""
    topics = Topics(EXP)
    hub = MqttLink(login(broker, creds, None), "floor-hub", subscriptions=[(topics.devices("update"), 1)])
    connect_blocking(hub, 10)
    replies = []
    stop = threading.Event()

    def responder(dev: str) -> None:
        link = MqttLink(login(broker, creds, dev), f"floor-{dev}", subscriptions=[(topics.round, 1)])
        connect_blocking(link, 10)
        replies.append(link)
        payload = bytes(update_size)
        while not stop.is_set():
            event = link.next_event(0.05)
            if isinstance(event, Message):
                link.publish(topics.device(dev, "update"), payload)

    threads = [threading.Thread(target=responder, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    while len(replies) < len(devices):
        time.sleep(0.01)
    time.sleep(0.3)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hub.publish(topics.round, bytes(400))
        got = 0
        while got < len(devices):
            if isinstance(hub.next_event(5.0), Message):
                got += 1
        times.append(time.perf_counter() - start)
    stop.set()
    for t in threads:
        t.join(2)
    for link in replies + [hub]:
        link.stop()
    return times


def round_overhead(root: Path, rounds: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    devices = [f"dev-{i:02d}" for i in range(20)]
    creds = credentials(devices)
    creds_path = creds.save(root / "credentials.json")
    with Broker(root / "broker", accounts=creds.accounts(), experiment=EXP) as broker:
        delta = mlp_delta(1)
        fleet = [LightDevice(login(broker, creds, d), EXP, d, creds.devices[d].hmac_key, creds.model_public_key,
                             delta=delta, samples=90, seed=i).start() for i, d in enumerate(devices)]
        config = basestation_config(root, broker, creds_path, round={"min_devices": 20, "deadline_seconds": 30.0,
                                                                     "report_wait_seconds": 3.0})
        station = Basestation(config, rounds=rounds)
        thread = threading.Thread(target=station.run, daemon=True)
        started = time.perf_counter()
        thread.start()
        thread.join(600)
        wall = time.perf_counter() - started
        for dev in fleet:
            dev.stop()
        update_size = len(encode_update(quantize_update(delta, 8, np.random.default_rng(0)), experiment=EXP,
                                        device=devices[0], round=1, base_hash=bytes(32), samples=90,
                                        key=creds.devices[devices[0]].hmac_key))
        floor = mqtt_floor(broker, creds, devices, update_size, 20)
    with Store(root / "bench.sqlite", readonly=True) as store:
        recs = store.rounds(EXP)
    opened = [r.opened_at for r in recs]
    cycles = [b - a for a, b in zip(opened, opened[1:])]
    closing = [r.closed_at - r.opened_at for r in recs if r.closed_at]
    overhead = statistics.median(cycles)
    return {
        "devices": 20, "rounds": len(recs), "wall_seconds": round(wall, 2),
        "round_overhead_ms_median": round(1e3 * overhead, 1),
        "round_overhead_ms_p90": round(1e3 * sorted(cycles)[int(0.9 * (len(cycles) - 1))], 1),
        "open_to_aggregated_ms_median": round(1e3 * statistics.median(closing), 1),
        "baseline_mqtt_fan_out_in_ms_median": round(1e3 * statistics.median(floor), 1),
        "ratio_to_baseline": round(overhead / statistics.median(floor), 2),
        "goal_ms": GOALS["round_overhead_ms"], "meets_goal": overhead * 1e3 < GOALS["round_overhead_ms"],
    }


# ---- 2. ingest throughput ----

def ingest_throughput(root: Path, count: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    devices = [f"d{i:05d}" for i in range(count)]
    rng = np.random.default_rng(0)
    keys = {d: rng.bytes(32) for d in devices}
    reference = {"0.weight": np.zeros((1000, 99), np.float32), "0.bias": np.zeros(1000, np.float32)}
    params = sum(v.size for v in reference.values())
    base = model_hash(reference)
    tensors = quantize_update({k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()},
                              8, rng)
    topics = Topics(EXP)
    messages = [(topics.device(d, "update"), encode_update(tensors, experiment=EXP, device=d, round=1,
                                                            base_hash=base, samples=50, key=keys[d]))
                for d in devices]

    def fresh_store(name: str) -> tuple[Store, Ingest]:
        store = Store(root / f"{name}.sqlite", synchronous="full")
        store.create_experiment(EXP, {})
        store.save_model(EXP, 1, base.hex(), reference)
        store.open_round(EXP, 1, selected=devices, n=8, m=8, deadline=1e12, quorum=1, model_hash=base.hex(), plan={})
        ingest = Ingest(store, EXP, keys)
        ingest.open_round(1, base, devices, reference)
        return store, ingest

    # Verification and decoding alone (the wire format's floor).
    start = time.perf_counter()
    for _, data in messages:
        verify_update(data, experiment=EXP, round=1, base_hash=base, key=keys.get, seen_nonces=())
    verify_rate = count / (time.perf_counter() - start)

    # The ingest path of the service, in batches of 256 per commit.
    store, ingest = fresh_store("ingest")
    acc = FedAvg().accumulator()
    start = time.perf_counter()
    for i in range(0, count, 256):
        with store.transaction():
            outcomes = [ingest.handle(topic, data) for topic, data in messages[i:i + 256]]
        for o in outcomes:
            acc.add(o.delta, o.samples)
    acc.result()
    rate = count / (time.perf_counter() - start)
    accepted = len(store.updates(EXP, 1))
    store.close()
    return {"params": params, "bits": 8, "message_bytes": len(messages[0][1]), "updates": count,
            "accepted": accepted, "ingest_updates_per_s": round(rate, 1),
            "baseline_verify_decode_updates_per_s": round(verify_rate, 1),
            "ratio_to_verify_decode": round(rate / verify_rate, 3),
            "goal_updates_per_s": GOALS["ingest_updates_per_s"],
            "meets_goal": rate >= GOALS["ingest_updates_per_s"] and accepted == count}


def ingest_via_broker(root: Path, count: int, workers: int = 0) -> dict:
    """The same kind of updates published through Mosquitto into a manual-ack ingest loop like the service's.

    ``workers`` > 0: the service's ``IngestWorkers`` check and decode them in that many processes on the
    shared subscription, and the loop hands each verdict to ``Ingest.handle`` and the PUBACK back to its worker.
    """
    root.mkdir(parents=True, exist_ok=True)
    devices = [f"d{i:05d}" for i in range(count)]
    creds = credentials([], seed=1)
    rng = np.random.default_rng(1)
    keys = {d: rng.bytes(32) for d in devices}
    reference = {"0.weight": np.zeros((1000, 99), np.float32), "0.bias": np.zeros(1000, np.float32)}
    base = model_hash(reference)
    tensors = quantize_update({k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()},
                              8, rng)
    topics = Topics(EXP)
    with Broker(root / "broker-ingest", accounts=creds.accounts(), experiment=EXP) as broker:
        store = Store(root / "via-broker.sqlite", synchronous="full")
        store.create_experiment(EXP, {})
        store.open_round(EXP, 1, selected=devices, n=8, m=8, deadline=1e12, quorum=1, model_hash=base.hex(), plan={})
        ingest = Ingest(store, EXP, keys)
        ingest.open_round(1, base, devices, reference)
        sink = MqttLink(login(broker, creds, None), "sink", manual_ack=True,
                        subscriptions=[] if workers else [(topics.devices("update"), 1)])
        connect_blocking(sink, 10)
        pool = None
        if workers:
            pool = IngestWorkers(login(broker, creds, None), EXP, keys, count=workers, client_id=f"sink-{workers}",
                                 deliver=sink.post).start()
            if not pool.wait_ready(60):
                raise RuntimeError("the ingest workers did not connect")
        payloads = [encode_update(tensors, experiment=EXP, device=d, round=1, base_hash=base, samples=50,
                                  key=keys[d]) for d in devices]
        acc = FedAvg().accumulator()
        start = time.perf_counter()
        # The devices' side runs in another process, as it would on other machines.
        publisher = multiprocessing.get_context("fork").Process(
            target=_publish_all, args=(login(broker, creds, None), topics, devices, payloads), daemon=True)
        publisher.start()
        done = 0
        while done < count:
            batch = [sink.next_event(10.0)]
            while len(batch) < 256 and (more := sink.next_event(0)) is not None:
                batch.append(more)
            msgs = [m for m in batch if isinstance(m, (Message, Checked))]
            with store.transaction():
                outcomes = [ingest.handle(m.topic, m.payload, checked=m.verdict if isinstance(m, Checked) else None)
                            for m in msgs]
            for o, m in zip(outcomes, msgs):
                if o.ack:
                    sink.publish(*o.ack)
                if o.delta is not None:
                    acc.add(o.delta, o.samples)
                if isinstance(m, Checked):
                    pool.ack(m)  # type: ignore[union-attr]
                else:
                    sink.ack(m)
            done += len(msgs)
        rate = count / (time.perf_counter() - start)
        publisher.join(30)
        if pool is not None:
            pool.stop()
        sink.stop()
        store.close()
    return {"updates": count, "workers": workers, "updates_per_s": round(rate, 1), "loadavg": os.getloadavg()[0]}


def service_ingest_scaling(root: Path, count: int, counts: tuple[int, ...] = (0, 1, 2, 4)) -> dict:
    """``ingest_via_broker`` with the service's ingest workers: 0 (in the loop itself), 1, 2 and 4 processes."""
    rows = [ingest_via_broker(root / f"workers-{n}", count, workers=n) for n in counts]
    base = rows[0]["updates_per_s"]
    for row in rows:
        row["ratio_to_in_loop"] = round(row["updates_per_s"] / base, 2)
    return {"rows": rows}


def _publish_all(settings: BrokerSettings, topics: Topics, devices: list[str], payloads: list[bytes]) -> None:
    source = MqttLink(settings, "source")
    connect_blocking(source, 10)
    infos = [source.publish(topics.device(d, "update"), p) for d, p in zip(devices, payloads)]
    for info in infos:
        info.wait_for_publish(60)
    source.stop()


# ---- 3. edge memory ----

def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def edge_memory(root: Path, rounds: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    from edge.data import load_dataset, partition, save_shard

    devices = ["dev-00", "dev-01"]
    creds = credentials(devices, seed=2)
    creds_path = creds.save(root / "mem-credentials.json")
    ds = load_dataset("digits", seed=0)
    qfl = str(Path(sys.executable).with_name("qfl"))
    with Broker(root / "broker-mem", accounts=creds.accounts(), experiment=EXP) as broker:
        procs = []
        for i, (dev, index) in enumerate(zip(devices, partition(ds.y_train, 2, "iid", seed=0))):
            shard = save_shard(root / f"{dev}.npz", ds.x_train[index], ds.y_train[index])
            entry = creds.devices[dev]
            cfg = root / f"{dev}.toml"
            cfg.write_text(toml_text({"device_id": dev, "experiment": EXP, "hmac_key": entry.hmac_key.hex(),
                                      "model_public_key": creds.model_public_key.hex(), "shard": str(shard),
                                      "spool_dir": str(root / f"spool-{dev}"), "exit_when_finished": False},
                                     {"broker": {"url": broker.url, "username": entry.username,
                                                 "password": entry.password}}))
            procs.append(subprocess.Popen([qfl, "edge", "run", "--config", str(cfg), "--log-level", "warning"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (root / "bench.sqlite").unlink(missing_ok=True)
        config = basestation_config(root, broker, creds_path, round={"min_devices": 2},
                                    training={"iterations": 50})
        station = Basestation(config, rounds=rounds)
        station.run()
        peaks = [peak_rss_mb(p.pid) for p in procs]
        for p in procs:
            p.terminate()
            p.wait(10)
    probe = subprocess.Popen([sys.executable, "-c", "import numpy, paho.mqtt.client, sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    time.sleep(1.0)
    baseline = peak_rss_mb(probe.pid)
    probe.communicate(b"")
    peak = max(peaks)
    return {"model": "mlp", "rounds": rounds, "edge_peak_rss_mb": round(peak, 1),
            "baseline_python_numpy_paho_mb": round(baseline, 1), "ratio_to_baseline": round(peak / baseline, 2),
            "goal_mb": GOALS["edge_peak_mb"], "meets_goal": peak <= GOALS["edge_peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the overhead measurement")
    parser.add_argument("--updates", type=int, default=2000, help="updates of the ingest measurement")
    parser.add_argument("--via-broker", type=int, default=500, help="updates of the through-the-broker measurement")
    parser.add_argument("--scale-updates", type=int, default=600, help="updates of the worker-scaling measurement")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qfl-bench-federation-"))
    try:
        result = {
            "benchmark": "federation", "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "round_overhead": round_overhead(root / "overhead", args.rounds),
            "ingest": ingest_throughput(root / "ingest", args.updates),
            "ingest_via_broker": ingest_via_broker(root / "via", args.via_broker),
            "ingest_scaling": scaling(args.scale_updates, (1, 2, 4), repeats=1),
            "service_ingest_workers": service_ingest_scaling(root / "workers", args.via_broker),
            "edge_memory": edge_memory(root / "memory", 3),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
