"""``summary.json`` of a testbed run: the figures a person or a script reads first."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from basestation.report import metrics
from basestation.report.data import RunData
from basestation.testbed.prepare import RunLayout
from basestation.testbed.settings import TestbedSettings


def summarize(settings: TestbedSettings, layout: RunLayout, run: RunData, seconds: float) -> dict[str, Any]:
    """The summary of ``run``; energies in joules, summed over every device, phase and round.

    ``energy_j`` is the measured board energy of all phases (idle included);
    ``energy_above_idle_j`` the part above each device's idle baseline, which
    ``energy_model_j`` (the model before calibration) and
    ``energy_calibrated_j`` (with the fit available at each round) predict.
    """
    rounds = run.sorted_rounds()
    target = metrics.energy_to_target(run, settings.target_accuracy)
    truth = run.ground_truth_j
    measured_phases = math.fsum(r.joules for r in run.energy)
    return {
        "name": settings.name,
        "experiment": settings.experiment,
        "store": layout.store.name,
        "devices": settings.devices,
        "rounds": len(rounds),
        "policy": settings.policy,
        "board": settings.board,
        "link": settings.link,
        "final_accuracy": rounds[-1].accuracy if rounds else None,
        "accuracy": [r.accuracy for r in rounds],
        "bits": [[r.bits_n, r.bits_m] for r in rounds],
        "per_round": settings.per_round or settings.devices,
        "sampling": settings.sampling,
        "participants": participants(layout.store, settings.experiment),
        "energy_j": metrics.total_measured_j(run),
        "energy_above_idle_j": math.fsum(r.joules_above_idle for r in run.energy),
        "energy_model_j": _sum_or_none(r.model_joules for r in run.energy),
        "energy_calibrated_j": _sum_or_none(r.calibrated_joules for r in run.energy),
        "energy_by_phase_j": _by_phase(run),
        "ground_truth_j": None if truth is None else math.fsum(truth.values()),
        "ground_truth_error": (None if not truth or measured_phases <= 0
                               else (measured_phases - math.fsum(truth.values())) / math.fsum(truth.values())),
        "ground_truth": {device: f"ground-truth/{device}.csv" for device in sorted(layout.devices)},
        "target_accuracy": settings.target_accuracy,
        "target_round": target.round,
        "energy_to_target_j": target.joules,
        "seconds": seconds,
        "meters": settings.meters,
        "fleet": _fleet_stats(layout),
        "loadavg_end": list(os.getloadavg()),
    }


def participants(store: Path, experiment: str) -> list[dict[str, Any]]:
    """For every aggregated round, the ids of the devices whose updates it aggregated (from the store)."""
    from basestation.store import Store

    db = Store(store, readonly=True)
    try:
        by_round: dict[int, set[str]] = {}
        for update in db.updates(experiment):
            if update.status == "aggregated":
                by_round.setdefault(update.round, set()).add(update.device)
        aggregated = [r.round for r in db.rounds(experiment) if r.status == "aggregated"]
    finally:
        db.close()
    return [{"round": r, "devices": sorted(by_round.get(r, ()))} for r in aggregated]


def _fleet_stats(layout: RunLayout) -> dict[str, Any] | None:
    """The fleet emulator's loop statistics (tick intervals, CPU, load, warnings), when it ran."""
    path = layout.root / "fleet-stats.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sum_or_none(values) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(known) if known else None


def _by_phase(run: RunData) -> dict[str, float]:
    phases: dict[str, list[float]] = {}
    for r in run.energy:
        phases.setdefault(r.phase, []).append(r.joules)
    return {phase: math.fsum(values) for phase, values in sorted(phases.items())}
