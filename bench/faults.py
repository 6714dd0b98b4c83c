"""The fault campaign of issue 14; prints one JSON object with one row per fault.

Runs each fault test (real Mosquitto, real ``qfl`` processes, real SQLite;
tests/faults/ and tests/test_federation_faults.py) in its own pytest
process, and beside them a clean run of the same kind (four edges, five
rounds: tests/test_federation.py) as the baseline: each row has the fault,
the test, its outcome (every test asserts the four invariants of
tests/faults/invariants.py), its wall time and its ratio to the clean run's.
The machine is shared, so ``loadavg`` is recorded with the figures.

Run: ``.venv/bin/python bench/faults.py [--only SUBSTRING]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ("clean run (4 edges, 5 rounds)", "tests/test_federation.py::test_four_edges_complete_five_rounds")
CAMPAIGN = [
    ("kill -9 broker mid-round", "tests/test_federation_faults.py::test_broker_restart_mid_round_loses_no_update"),
    ("kill -9 basestation mid-round",
     "tests/test_federation_faults.py::test_basestation_killed_mid_round_resumes_without_double_counting"),
    ("kill -9 one edge mid-round",
     "tests/test_federation_faults.py::test_dropout_closes_at_deadline_with_quorum_and_device_rejoins"),
    ("kill -9 edge before its ack, restart",
     "tests/test_federation_faults.py::test_edge_restart_resends_its_unacknowledged_update"),
    ("SIGSTOP edge past the deadline, SIGCONT",
     "tests/faults/test_fault_campaign.py::test_edge_stopped_past_the_deadline_then_continued"),
    ("meter unplugged 3 s", "tests/faults/test_fault_campaign.py::test_meter_unplugged_for_three_seconds"),
    ("store becomes read-only", "tests/faults/test_fault_campaign.py::test_store_that_becomes_read_only"),
    ("fuzz 2,000 mutants, half re-signed", "tests/faults/test_fault_campaign.py::test_live_fuzz_half_resigned"),
    ("exp-127 update, restart with it stored",
     "tests/test_poison_update.py::test_restart_with_a_poisoned_update_already_stored_does_not_crash"),
    ("retained poison on the broker, restart",
     "tests/test_poison_update.py::test_restart_with_a_retained_poison_on_the_broker"),
]


def run_one(node: str) -> dict[str, object]:
    """Run one pytest node id; outcome from pytest's exit status (0 passed, 5 none collected, else failed)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    outcome = "passed" if done.returncode == 0 and "skipped" not in tail else (
        "skipped" if "skipped" in tail else "failed")
    return {"test": node, "outcome": outcome, "seconds": round(seconds, 2), "summary": tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the faults whose name contains this")
    args = parser.parse_args()
    load_before = os.getloadavg()
    base = run_one(BASELINE[1])
    rows = []
    for fault, node in CAMPAIGN:
        if args.only and args.only not in fault:
            continue
        row = {"fault": fault, **run_one(node)}
        row["ratio_to_clean_run"] = round(row["seconds"] / base["seconds"], 2) if base["seconds"] else None
        rows.append(row)
    print(json.dumps({
        "benchmark": "fault campaign (issue 14)",
        "invariants": ["nothing the broker acknowledged is lost", "nothing aggregated twice",
                       "PRAGMA integrity_check ok", "completes, or one-line error and no traceback"],
        "baseline": {"fault": BASELINE[0], **base},
        "rows": rows,
        "passed": sum(r["outcome"] == "passed" for r in rows), "total": len(rows),
        "campaign_seconds": round(sum(r["seconds"] for r in rows), 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }, indent=2))
    return 0 if all(r["outcome"] == "passed" for r in rows) and base["outcome"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
