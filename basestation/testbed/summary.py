"""``summary.json`` of a testbed run: the figures a person or a script reads first."""

from __future__ import annotations

import math
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
    }


def _sum_or_none(values) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(known) if known else None


def _by_phase(run: RunData) -> dict[str, float]:
    phases: dict[str, list[float]] = {}
    for r in run.energy:
        phases.setdefault(r.phase, []).append(r.joules)
    return {phase: math.fsum(values) for phase, values in sorted(phases.items())}
