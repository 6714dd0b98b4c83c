"""The figures a report states, computed from :class:`RunData` alone (pure, no I/O).

Conventions, also in docs/report.md:

- measured energy is ``EnergyRecord.joules`` (the whole board, idle included),
  summed over devices and phases; the cumulative energy of round r counts
  every record of rounds <= r;
- the model is compared with the energy above the idle baseline
  (``joules_above_idle``), the number the energy model is calibrated against;
  the modelling error of a record is ``|model - measured| / measured``; MAPE
  is its mean over the records that have both numbers and a positive
  measurement, in percent; WAPE is ``sum |model - measured| / sum measured``
  over the same records;
- the energy to reach a target accuracy is the cumulative measured energy of
  the first round whose accuracy is at least the target;
- the saving of a run is ``(E_baseline - E_run) / E_baseline`` in percent.

    >>> target = energy_to_target(run, 0.9)
    >>> target.round, target.joules            # (None, None) when never reached
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from basestation.report.data import EnergyRecord, ReportError, RunData, finite, natural_key

def measured(record: EnergyRecord) -> float:
    """The measured energy a prediction is compared with: joules above idle.

    The energy model predicts the work of training and sending
    (basestation.energy.records) and is calibrated against exactly this.
    """
    return float(record.joules_above_idle)


def total_measured_j(run: RunData) -> float:
    """Sum of the measured energy of every stored energy report of the run."""
    return math.fsum(r.joules for r in run.energy)


def energy_by_round(run: RunData) -> dict[int, float]:
    """Measured energy per round (all devices and phases), keyed by round number."""
    per_round: dict[int, list[float]] = defaultdict(list)
    for r in run.energy:
        per_round[r.round].append(r.joules)
    return {k: math.fsum(v) for k, v in sorted(per_round.items())}


def unaggregated_energy(run: RunData) -> dict[int, float]:
    """Measured energy of rounds that have energy reports but no stored result, keyed by round.

    A run stopped mid-round (Ctrl-C, a killed basestation) leaves such a
    round: its devices trained and sent, but no global model came of it. The
    energy was spent, so the total counts it; the report says how much.
    """
    aggregated = {r.round for r in run.rounds}
    return {k: v for k, v in energy_by_round(run).items() if k not in aggregated}


def cumulative_energy(run: RunData) -> list[tuple[int, float]]:
    """``(round, cumulative measured joules up to and including it)`` for each stored round.

    Energy reports of rounds that have no stored result (a round cut short)
    still count towards the later rounds' cumulative energy.
    """
    per_round = energy_by_round(run)
    keys = sorted(per_round)
    counted: list[float] = []
    result = []
    i = 0
    for number in sorted({r.round for r in run.rounds}):
        while i < len(keys) and keys[i] <= number:
            counted.append(per_round[keys[i]])
            i += 1
        result.append((number, math.fsum(counted)))
    return result


def ape(record: EnergyRecord, predicted: float | None) -> float | None:
    """Absolute percentage error of ``predicted`` against the record's measurement, or None."""
    truth = measured(record)
    if not finite(predicted) or not finite(truth) or truth <= 0:
        return None
    return abs(float(predicted) - truth) / truth * 100.0


def mape(records: list[EnergyRecord], which: str) -> float | None:
    """Mean absolute percentage error of ``which`` ("model" or "calibrated") over ``records``.

    None when no record has both a prediction and a positive measurement.
    """
    errors = [e for e in (ape(r, _prediction(r, which)) for r in records) if e is not None]
    return math.fsum(errors) / len(errors) if errors else None


def wape(records: list[EnergyRecord], which: str) -> float | None:
    """Weighted absolute percentage error: ``sum |predicted - measured| / sum measured`` over the records
    :func:`mape` uses, in percent.

    Unlike MAPE it is not dominated by phases whose measurement is close to
    zero (a millisecond uplink above idle), so it tells how far off the
    energy the model predicts in total is.
    """
    pairs = [(float(_prediction(r, which)), measured(r)) for r in records if ape(r, _prediction(r, which)) is not None]
    if not pairs:
        return None
    return math.fsum(abs(p - m) for p, m in pairs) / math.fsum(m for _, m in pairs) * 100.0


def _prediction(record: EnergyRecord, which: str) -> float | None:
    if which == "model":
        return record.model_joules
    if which == "calibrated":
        return record.calibrated_joules
    raise ValueError(f"prediction must be 'model' or 'calibrated', got {which!r}")


def _sum_known(values: list[float | None]) -> float | None:
    known = [float(v) for v in values if finite(v)]
    return math.fsum(known) if known else None


@dataclass(frozen=True)
class GroupError:
    """Measured against modelled energy over a group of records (a phase, a device or a round).

    ``measured_j`` is the measured number the model is compared with (above
    idle) over all ``records``; ``model_j`` and ``calibrated_j`` sum the
    ``with_model`` and ``with_calibrated`` records that have a prediction.
    """

    key: str
    records: int
    with_model: int
    with_calibrated: int
    measured_j: float
    model_j: float | None
    calibrated_j: float | None
    mape_model: float | None
    mape_calibrated: float | None
    wape_model: float | None
    wape_calibrated: float | None


def _group_errors(groups: dict[str, list[EnergyRecord]]) -> list[GroupError]:
    return [
        GroupError(
            key=key,
            records=len(items),
            with_model=sum(1 for r in items if finite(r.model_joules)),
            with_calibrated=sum(1 for r in items if finite(r.calibrated_joules)),
            measured_j=math.fsum(m for m in map(measured, items) if math.isfinite(m)),
            model_j=_sum_known([r.model_joules for r in items]),
            calibrated_j=_sum_known([r.calibrated_joules for r in items]),
            mape_model=mape(items, "model"),
            mape_calibrated=mape(items, "calibrated"),
            wape_model=wape(items, "model"),
            wape_calibrated=wape(items, "calibrated"),
        )
        for key, items in groups.items()
    ]


def errors_by(run: RunData, key: str) -> list[GroupError]:
    """Measured and modelled energy with MAPE grouped by ``key`` ("phase", "device" or "round")."""
    return group_errors(run.energy, key)


def group_errors(records: list[EnergyRecord], key: str) -> list[GroupError]:
    """Like :func:`errors_by` over any list of records (e.g. the records of one phase)."""
    if key not in ("phase", "device", "round"):
        raise ValueError(f"group key must be 'phase', 'device' or 'round', got {key!r}")
    groups: dict[str, list[EnergyRecord]] = defaultdict(list)
    order = natural_key if key != "round" else int
    for r in sorted(records, key=lambda r: (order(getattr(r, key)), natural_key(r.device), r.round, r.phase)):
        groups[str(getattr(r, key))].append(r)
    return _group_errors(groups)


def overall_error(run: RunData) -> GroupError:
    """Measured and modelled energy with MAPE over all records of the run."""
    return _group_errors({"all": list(run.energy)})[0]


@dataclass(frozen=True)
class DeviceTruth:
    """One device's measured energy beside its emulator's ground truth."""

    device: str
    measured_j: float
    ground_truth_j: float | None
    difference_pct: float | None


def ground_truth_agreement(run: RunData) -> list[DeviceTruth]:
    """Per device: measured total, ground truth and ``(measured - truth) / truth`` in percent.

    Empty when the run has no ground-truth logs. A device with a log but no
    energy report shows 0 J measured; one without a log shows no truth.
    """
    if run.ground_truth_j is None:
        return []
    totals: dict[str, list[float]] = defaultdict(list)
    for r in run.energy:
        totals[r.device].append(r.joules)
    rows = []
    for device in sorted(set(totals) | set(run.ground_truth_j), key=natural_key):
        got = math.fsum(totals.get(device, []))
        truth = run.ground_truth_j.get(device)
        diff = (got - truth) / truth * 100.0 if finite(truth) and truth > 0 else None
        rows.append(DeviceTruth(device, got, truth, diff))
    return rows


@dataclass(frozen=True)
class TargetResult:
    """When a run first reached the target accuracy and the measured energy it took."""

    target: float
    round: int | None
    joules: float | None

    @property
    def reached(self) -> bool:
        return self.round is not None


def energy_to_target(run: RunData, target: float) -> TargetResult:
    """First round with accuracy >= ``target`` and the cumulative measured energy up to it."""
    if not finite(target) or not 0.0 <= target <= 1.0:
        raise ReportError(f"target accuracy must be a number in [0, 1], got {target!r}")
    cumulative = dict(cumulative_energy(run))
    for r in run.sorted_rounds():
        if finite(r.accuracy) and r.accuracy >= target:
            return TargetResult(target, r.round, cumulative[r.round])
    return TargetResult(target, None, None)


@dataclass(frozen=True)
class Comparison:
    """One run's line in the comparison table."""

    name: str
    is_baseline: bool
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    total_j: float
    target: TargetResult
    saving_pct: float | None


def compare(runs: list[RunData], target: float, baseline: str | None = None) -> list[Comparison]:
    """The comparison table: energy to ``target`` and the saving against the baseline run.

    The baseline is the run named ``baseline`` or, when None, the first run.
    The saving is None when the baseline or the run never reached the target.
    """
    if not runs:
        raise ReportError("a comparison needs at least one run")
    names = [run.name for run in runs]
    if baseline is None:
        base_index = 0
    elif baseline in names:
        base_index = names.index(baseline)
    else:
        raise ReportError(f"baseline run {baseline!r} is not among the runs: {', '.join(names)}")
    results = [energy_to_target(run, target) for run in runs]
    base = results[base_index]
    table = []
    for i, (run, result) in enumerate(zip(runs, results)):
        accuracies = [r.accuracy for r in run.sorted_rounds() if finite(r.accuracy)]
        saving = None
        if base.reached and result.reached and base.joules and base.joules > 0:
            saving = (base.joules - result.joules) / base.joules * 100.0
        table.append(Comparison(
            name=run.name,
            is_baseline=i == base_index,
            rounds=len(run.rounds),
            final_accuracy=accuracies[-1] if accuracies else None,
            best_accuracy=max(accuracies) if accuracies else None,
            total_j=total_measured_j(run),
            target=result,
            saving_pct=saving,
        ))
    return table


def run_notes(run: RunData) -> list[str]:
    """Plain sentences on what the report cannot show for this run, and why."""
    notes = list(run.notes)
    if not run.rounds:
        notes.append("No rounds were recorded: there is no accuracy, precision or per-round energy to show.")
    elif len(run.rounds) == 1:
        notes.append("Only one round was recorded: the curves below are single points, not trends.")
    if not run.energy:
        notes.append("No energy reports were stored: measured energy is zero and nothing can be compared.")
    else:
        if not any(finite(r.model_joules) for r in run.energy):
            notes.append("No modelled energy was stored: the error before calibration cannot be shown.")
        if not any(finite(r.calibrated_joules) for r in run.energy):
            notes.append("No calibrated energy was stored: the error after calibration cannot be shown.")
        partial = sum(1 for r in run.energy if r.partial)
        if partial:
            notes.append(f"{partial} of {len(run.energy)} energy reports are partial "
                         "(the meter missed samples during the phase).")
        orphan = sorted(unaggregated_energy(run))
        if orphan and run.rounds:
            notes.append(f"Energy reports of rounds without a stored result ({round_ranges(orphan)}) are "
                         "counted in the totals and in the cumulative energy of later rounds.")
    if run.ground_truth_j is None:
        notes.append("No emulator ground-truth logs were found (expected for runs on real meters).")
    return notes


def round_ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
