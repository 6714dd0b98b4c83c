"""Load test: one basestation against 100, 300 and 1,000 light devices; prints one JSON object.

    .venv/bin/python bench/load.py [--counts 100,300,1000] [--rounds 4]

Each device is a ``basestation.loadgen.LightDevice``: a real MQTT client
with its own broker login, signed hello, and a signed update (the digits MLP
difference, 8 bits) plus energy report whenever a plan selects it, against
the private Mosquitto and the real basestation service (in a thread of this
process). The devices live in worker processes of at most
``--devices-per-process`` each: paho's network loop uses ``select()``, which
cannot watch descriptors above 1,024, and one process holding every client
would also serialise them all on one GIL. Every device is selected every
round. Per count it reports:
- ``round_overhead_ms_median``/``_p95``: time from one round's opening to the
  next one's, i.e. the whole fan-out, N updates in, aggregation, evaluation
  and the wait for energy reports;
- ``lost_updates``: updates of selected devices the rounds did not aggregate
  (a device that missed a deadline counts as lost);
- ``basestation_cpu_s_per_round``: CPU seconds of this process (the
  basestation; the devices are elsewhere) per round;
- ``broker_peak_mb``: the broker's peak resident memory (VmHWM);
- ``loadavg`` at the end (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from federation import EXP, basestation_config, credentials, login, mlp_delta, peak_rss_mb  # noqa: E402

from basestation.broker import Broker  # noqa: E402
from edge.mqtt import BrokerSettings  # noqa: E402
from basestation.loadgen import LightDevice  # noqa: E402
from basestation.service import Basestation  # noqa: E402
from basestation.store import Store  # noqa: E402


def run_devices(settings: list[tuple[str, BrokerSettings, bytes]], model_key: bytes, first_seed: int,
                stop: "multiprocessing.synchronize.Event", ready: "multiprocessing.synchronize.Barrier") -> None:
    """Worker process: run one light device per (id, login, HMAC key) until ``stop`` is set."""
    delta = mlp_delta(1)
    fleet = [LightDevice(login, EXP, device, key, model_key, delta=delta, samples=90, seed=first_seed + i).start()
             for i, (device, login, key) in enumerate(settings)]
    ready.wait()
    stop.wait()
    for dev in fleet:
        dev.stop()


def load(root: Path, count: int, rounds: int, per_process: int) -> dict[str, object]:
    """One basestation, ``count`` light devices in worker processes, ``rounds`` rounds."""
    root.mkdir(parents=True, exist_ok=True)
    devices = [f"dev-{i:04d}" for i in range(count)]
    creds = credentials(devices)
    creds_path = creds.save(root / "credentials.json")
    spawn = multiprocessing.get_context("spawn")
    with Broker(root / "broker", accounts=creds.accounts(), experiment=EXP) as broker:
        stop = spawn.Event()
        slices = [devices[i:i + per_process] for i in range(0, count, per_process)]
        ready = spawn.Barrier(len(slices) + 1)
        workers = [spawn.Process(target=run_devices, daemon=True,
                                 args=([(d, login(broker, creds, d), creds.devices[d].hmac_key) for d in part],
                                       creds.model_public_key, k * per_process, stop, ready))
                   for k, part in enumerate(slices)]
        for worker in workers:
            worker.start()
        ready.wait(300)
        config = basestation_config(root, broker, creds_path,
                                    round={"min_devices": count, "deadline_seconds": 120.0, "quorum": 0.5,
                                           "report_wait_seconds": 3.0})
        station = Basestation(config, rounds=rounds)
        thread = threading.Thread(target=station.run, daemon=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        thread.start()
        thread.join(1500)
        wall = time.perf_counter() - started
        station_cpu = time.process_time() - cpu_started
        broker_mb = peak_rss_mb(broker.pid) if broker.pid else None
        stop.set()
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    with Store(root / "bench.sqlite", readonly=True) as store:
        recs = store.rounds(EXP)
        updates = store.updates(EXP)
    opened = [r.opened_at for r in recs]
    cycles = sorted(b - a for a, b in zip(opened, opened[1:]))
    aggregated = sum(u.status == "aggregated" for u in updates)
    selected = sum(len(r.selected) for r in recs if r.status == "aggregated")
    return {"devices": count, "processes": len(slices), "rounds": len(recs), "wall_seconds": round(wall, 1),
            "round_overhead_ms_median": round(1e3 * statistics.median(cycles), 1) if cycles else None,
            "round_overhead_ms_p95": round(1e3 * cycles[min(len(cycles) - 1, int(0.95 * len(cycles)))], 1)
            if cycles else None,
            "basestation_cpu_s_per_round": round(station_cpu / max(1, len(recs)), 2),
            "lost_updates": selected - aggregated, "broker_peak_mb": broker_mb, "loadavg": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,300,1000")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--devices-per-process", type=int, default=100,
                        help="light devices per worker process (default 100; keep the process under 1,024 fds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [load(Path(tmp) / f"n{n}", int(n), args.rounds, args.devices_per_process)
                for n in args.counts.split(",")]
        print(json.dumps({"bench": "load", "cores": os.cpu_count(), "rows": rows}, indent=2), flush=True)


if __name__ == "__main__":
    main()
