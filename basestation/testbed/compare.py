"""``qfl testbed --compare``: standard 32-bit FL, then the adaptive policy, same seed and data.

Both runs go under ``<out>/<name>/``; the comparison report beside them
states the measured energy each needed to reach the target accuracy and the
saving of the adaptive run against the 32-bit baseline.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from basestation.testbed.run import run_testbed
from basestation.testbed.settings import TestbedSettings

BASELINE = "standard-fl-32bit"


def run_comparison(settings: TestbedSettings, console: Console) -> dict[str, Any]:
    """Run both and write the comparison report; returns the comparison summary."""
    from basestation.report.load import load_run
    from basestation.report.writer import write_report

    folder = settings.out / settings.name
    adaptive_policy = settings.policy if settings.policy != "fixed" else "measured"
    baseline = dataclasses.replace(settings, out=folder, name=BASELINE, policy="fixed", bits=32, uplink_bits=32)
    adaptive = dataclasses.replace(settings, out=folder, name=f"adaptive-{adaptive_policy}", policy=adaptive_policy)
    results = [run_testbed(s, console) for s in (baseline, adaptive)]
    runs = [load_run(r.run_dir) for r in results]
    report = write_report(runs, folder, target_accuracy=settings.target_accuracy, baseline=BASELINE).html
    base, other = (r.summary for r in results)
    saving = None
    if base["energy_to_target_j"] and other["energy_to_target_j"] is not None:
        saving = 1.0 - other["energy_to_target_j"] / base["energy_to_target_j"]
    comparison = {"target_accuracy": settings.target_accuracy, "baseline": base, "adaptive": other,
                  "saving_to_target": saving, "report": str(report)}
    (folder / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    console.print(_table(base, other, saving, settings.target_accuracy))
    console.print(f"comparison report: {report}", highlight=False)
    return comparison


def _table(base: dict[str, Any], other: dict[str, Any], saving: float | None, target: float) -> Table:
    table = Table(title=f"measured energy to reach accuracy {target:.2f}")
    for column in ("run", "final accuracy", "round reached", "energy to target J", "total J", "bits n/m (last)"):
        table.add_column(column, no_wrap=(column == "run"))
    for s in (base, other):
        last = s["bits"][-1] if s["bits"] else ["-", "-"]
        reached = "not reached" if s["target_round"] is None else str(s["target_round"])
        energy = "-" if s["energy_to_target_j"] is None else f"{s['energy_to_target_j']:.3g}"  # the saving's digits
        table.add_row(s["name"], f"{s['final_accuracy']:.3f}" if s["final_accuracy"] is not None else "-", reached,
                      energy, f"{s['energy_j']:.3g}", f"{last[0]}/{last[1]}")
    table.caption = "saving: " + ("n/a (a run did not reach the target)" if saving is None else f"{saving:.1%}")
    return table
