"""Meter fidelity of the fleet emulator against the number of devices; prints one JSON object.

    .venv/bin/python bench/fleet.py [--counts 5,20,50] [--rounds 4]

Runs the whole testbed (``qfl testbed --per-round 5 --dataset mnist-subset
--model mlp-mnist --partition dirichlet:0.1 --policy fixed``) with N
devices for each N in ``--counts``, every meter in one fleet emulator,
plus a baseline in the same run: the first count with one emulator process
per meter (``--meters process``). Per run it reports:
- ``ground_truth_error``: (measured - ground truth) / ground truth over every phase of every device;
- ``tick_p50_ms``/``tick_p95_ms``: the intervals the fleet loop achieved (nominal 10 ms);
- ``fleet_cpu_share``: the fleet process's CPU per wall second (one core = 1.0);
- ``meter_rate_hz``: the rate each meter ran at (the fleet's sample budget shared out);
- ``seconds`` (wall time of the run) and ``loadavg`` at its end (the machine is shared);
- ``warnings``: how often the fleet said the machine was too loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(count: int, rounds: int, meters: str, out: Path) -> dict[str, object]:
    """One testbed run; its summary's figures."""
    name = f"{meters}-{count}"
    argv = [sys.executable, "-m", "edge.cli", "testbed", "--devices", str(count), "--per-round", str(min(5, count)),
            "--dataset", "mnist-subset", "--model", "mlp-mnist", "--partition", "dirichlet:0.1", "--rounds",
            str(rounds), "--policy", "fixed", "--meters", meters, "--out", str(out), "--name", name, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"devices": count, "meters": meters, "error": done.stderr.strip().splitlines()[-1:]}
    summary = json.loads(done.stdout)
    fleet = summary.get("fleet") or {}
    return {"devices": count, "meters": meters, "seconds": summary["seconds"],
            "ground_truth_error": summary["ground_truth_error"], "final_accuracy": summary["final_accuracy"],
            "tick_p50_ms": fleet.get("interval_p50_ms"), "tick_p95_ms": fleet.get("interval_p95_ms"),
            "fleet_cpu_share": fleet.get("cpu_share"), "warnings": len(fleet.get("warnings", [])),
            "meter_rate_hz": json.loads((out / name / "config.json").read_text()).get("meter_rate_hz")
            if meters == "process" else min(1000, max(100, 12_500 // count)),
            "loadavg": summary["loadavg_end"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5,20,50")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = run(counts[0], args.rounds, "process", Path(tmp))
        rows = [run(n, args.rounds, "fleet", Path(tmp)) for n in counts]
    print(json.dumps({"bench": "fleet", "cores": os.cpu_count(), "baseline": baseline, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
