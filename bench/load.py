"""Load test: one basestation against 100, 300 and 1,000 light devices; prints one JSON object.

    .venv/bin/python bench/load.py [--counts 100,300,1000] [--rounds 4]

Each device is a ``basestation.loadgen.LightDevice``: a real MQTT client
with its own broker login, signed hello, and a signed update (the digits MLP
difference, 8 bits) plus energy report whenever a plan selects it, against
the private Mosquitto and the real basestation service (in a thread of this
process; the devices' paho threads live here too). Every device is selected
every round. Per count it reports:
- ``round_overhead_ms_median``/``_p95``: time from one round's opening to the
  next one's, i.e. the whole fan-out, N updates in, aggregation, evaluation
  and the wait for energy reports;
- ``lost_updates``: updates of selected devices the rounds did not aggregate
  (a device that missed a deadline counts as lost);
- ``broker_peak_mb``: the broker's peak resident memory (VmHWM);
- ``loadavg`` at the end (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
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
from basestation.loadgen import LightDevice  # noqa: E402
from basestation.service import Basestation  # noqa: E402
from basestation.store import Store  # noqa: E402


def load(root: Path, count: int, rounds: int) -> dict[str, object]:
    """One basestation, ``count`` light devices, ``rounds`` rounds."""
    root.mkdir(parents=True, exist_ok=True)
    devices = [f"dev-{i:04d}" for i in range(count)]
    creds = credentials(devices)
    creds_path = creds.save(root / "credentials.json")
    with Broker(root / "broker", accounts=creds.accounts(), experiment=EXP) as broker:
        delta = mlp_delta(1)
        fleet = [LightDevice(login(broker, creds, d), EXP, d, creds.devices[d].hmac_key, creds.model_key,
                             delta=delta, samples=90, seed=i).start() for i, d in enumerate(devices)]
        config = basestation_config(root, broker, creds_path,
                                    round={"min_devices": count, "deadline_seconds": 120.0, "quorum": 0.5,
                                           "report_wait_seconds": 3.0})
        station = Basestation(config, rounds=rounds)
        thread = threading.Thread(target=station.run, daemon=True)
        started = time.perf_counter()
        thread.start()
        thread.join(1500)
        wall = time.perf_counter() - started
        broker_mb = peak_rss_mb(broker.pid) if broker.pid else None
        for dev in fleet:
            dev.stop()
    with Store(root / "bench.sqlite", readonly=True) as store:
        recs = store.rounds(EXP)
        updates = store.updates(EXP)
    opened = [r.opened_at for r in recs]
    cycles = sorted(b - a for a, b in zip(opened, opened[1:]))
    aggregated = sum(u.status == "aggregated" for u in updates)
    selected = sum(len(r.selected) for r in recs if r.status == "aggregated")
    return {"devices": count, "rounds": len(recs), "wall_seconds": round(wall, 1),
            "round_overhead_ms_median": round(1e3 * statistics.median(cycles), 1) if cycles else None,
            "round_overhead_ms_p95": round(1e3 * cycles[min(len(cycles) - 1, int(0.95 * len(cycles)))], 1)
            if cycles else None,
            "lost_updates": selected - aggregated, "broker_peak_mb": broker_mb, "loadavg": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,300,1000")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [load(Path(tmp) / f"n{n}", int(n), args.rounds) for n in args.counts.split(",")]
        print(json.dumps({"bench": "load", "cores": os.cpu_count(), "rows": rows}, indent=2), flush=True)


if __name__ == "__main__":
    main()
