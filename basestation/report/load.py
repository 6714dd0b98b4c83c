"""Read a run directory into :class:`RunData`.

A run directory (written by ``qfl testbed``, or assembled by hand around a
field basestation's store) holds:

- the basestation's SQLite store (``*.sqlite``, ``*.sqlite3`` or ``*.db``, or
  the file ``summary.json`` names under ``"store"``): rounds, their plans and
  evaluations, energy reports, calibration fits and precision decisions;
- ``summary.json`` (optional): ``"name"`` and ``"experiment"`` pick the run's
  name and the experiment inside the store;
- ``config.json`` or ``config.toml`` (optional): the run's configuration,
  shown in the report (else the configuration stored with the experiment);
- the emulated meters' ground-truth power logs (optional, see
  :mod:`basestation.report.truth`).

    >>> run = load_run("runs/2026-01-01-int8")
    >>> len(run.rounds), run.ground_truth_j is not None
"""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basestation.report.data import EnergyRecord, ReportError, RoundRecord, RunData
from basestation.report.predict import Work, fit_at, predict_phase
from basestation.report.truth import PhaseWindow, find_ground_truth, ground_truth_energy, phase_windows

STORE_PATTERNS = ("*.sqlite", "*.sqlite3", "*.db")
NO_WORK = "neither the energy report nor the round plan gives n, m, iterations, minibatch and model"


def load_run(path: str | Path, *, experiment: str | None = None) -> RunData:
    """Read the run directory ``path``; ``experiment`` picks one when the store holds several.

    Raises :class:`ReportError` when ``path`` is not a run directory or a file
    in it cannot be read. What is merely missing (no rounds, no modelled
    energy, no ground truth) becomes a note the report shows.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; give the run directory 'qfl testbed' wrote")
    summary = read_json_object(run_dir / "summary.json")
    config = _read_config(run_dir)
    store_path = find_store(run_dir, summary)
    if store_path is None:
        if not summary and not config:
            raise ReportError(f"{run_dir} holds no basestation store ({', '.join(STORE_PATTERNS)}) and no "
                              "summary.json: not a run directory")
        name = str(summary.get("name") or config.get("name") or run_dir.name)
        return RunData(name, run_dir, config, [], [], [], None,
                       notes=["The run directory holds no basestation store, so nothing was recorded."])
    wanted = experiment or summary.get("experiment") or config.get("experiment")
    contents = read_store(store_path, wanted if isinstance(wanted, str) else None)
    truth, truth_notes = _ground_truth(run_dir, summary, contents)
    name = str(summary.get("name") or config.get("name") or contents.experiment)
    return RunData(name=name, path=run_dir, config=config or contents.config, rounds=contents.rounds,
                   energy=contents.energy, decisions=contents.decisions, ground_truth_j=truth,
                   notes=contents.notes + truth_notes, rejections=contents.rejections)


def find_store(run_dir: Path, summary: dict) -> Path | None:
    """The store file of a run directory: the one ``summary.json`` names, else the only ``*.sqlite``/``*.db``."""
    named = summary.get("store")
    if isinstance(named, str) and named:
        path = (run_dir / named) if not Path(named).is_absolute() else Path(named)
        if not path.is_file():
            raise ReportError(f"summary.json names the store {named!r}, but {path} does not exist")
        return path
    found = sorted({p for pattern in STORE_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})
    if len(found) > 1:
        raise ReportError(f"{run_dir} holds several stores ({', '.join(p.name for p in found)}); name one in "
                          "summary.json as {\"store\": \"FILE\"}")
    return found[0] if found else None


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` ({} if the file is absent); ReportError if it is not one."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def _read_config(run_dir: Path) -> dict:
    if (run_dir / "config.json").exists():
        return read_json_object(run_dir / "config.json")
    path = run_dir / "config.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ReportError(f"{path} is not readable TOML: {exc}") from None


@dataclass(frozen=True)
class StoreContents:
    """What :func:`read_store` found for one experiment, already in the report's terms."""

    experiment: str
    config: dict
    rounds: list[RoundRecord]
    energy: list[EnergyRecord]
    decisions: list[dict]
    windows: list[PhaseWindow]
    notes: list[str]
    rejections: list[dict] = field(default_factory=list)


def read_store(path: Path, experiment: str | None = None) -> StoreContents:
    """Read one experiment of the basestation store at ``path`` (the only one, unless ``experiment`` is given)."""
    from basestation.store import Store, StoreError

    if path.stat().st_size == 0:        # Store() would turn an empty file into a new, empty store
        raise ReportError(f"the store {path} is an empty file")
    try:
        store = Store(path, readonly=True)
    except (StoreError, OSError) as exc:
        raise ReportError(f"cannot read the store {path}: {exc}") from None
    with store:
        try:
            record = pick_experiment(store, path, experiment,
                                     hint="name one in summary.json as {\"experiment\": \"ID\"}")
            return _contents(store, record)
        except sqlite3.DatabaseError as exc:  # damage past the header shows only when a page is read
            raise ReportError(f"the store {path} is damaged: {exc}; restore it from a copy, or recover what "
                              f"is readable with 'sqlite3 {path} .recover'") from None


def pick_experiment(store: Any, path: Path, experiment: str | None, *, hint: str) -> Any:
    """The store's record of ``experiment``, or of its only experiment when None; ReportError otherwise,
    ending with ``hint`` (how the caller names one)."""
    ids = [e.id for e in store.experiments()]
    if experiment is None:
        if len(ids) != 1:
            raise ReportError(f"{path} holds {len(ids)} experiments ({', '.join(ids) or 'none'}); {hint}")
        experiment = ids[0]
    record = store.experiment(experiment)
    if record is None:
        raise ReportError(f"{path} has no experiment {experiment!r}; it has: {', '.join(ids) or 'none'}")
    return record


def _contents(store: Any, record: Any) -> StoreContents:
    from basestation.energy.calibration import Calibration

    experiment = record.id
    notes: list[str] = []
    stored_rounds = store.rounds(experiment)
    rounds = [_round(r) for r in stored_rounds if r.status == "aggregated"]
    skipped = [r for r in stored_rounds if r.status != "aggregated"]
    if skipped:
        notes.append(f"{len(skipped)} stored round(s) produced no model and are left out of the accuracy and "
                     f"precision figures: " + ", ".join(f"{r.round} ({r.status})" for r in skipped) + ".")

    opened = {r.round: r.opened_at for r in stored_rounds}
    plans = {r.round: store.plan(experiment, r.round) or {} for r in stored_rounds}
    fits = []
    for number, fitted_at, fit in store.calibrations(experiment):
        try:
            fits.append((fitted_at, Calibration.from_dict(fit)))
        except ValueError as exc:
            notes.append(f"The calibration stored with round {number} cannot be read ({exc}); it is skipped.")
    fits.sort(key=lambda item: item[0])
    sent = {(u.device, u.round): 8 * u.bytes for u in store.updates(experiment)}
    phases = store.energy(experiment)
    reports = {(e.device, e.round): store.energy_report(experiment, e.device, e.round) or {} for e in phases}

    energy = []
    unusable = 0
    unmodelled: dict[str, int] = {}
    for e in phases:
        if e.joules is None or not math.isfinite(e.joules):
            unusable += 1
            continue
        work = _work(reports[(e.device, e.round)], plans.get(e.round, {}), e.device, sent.get((e.device, e.round)),
                     record.config)
        model_j = calibrated_j = None
        try:
            if work is None:
                raise ValueError(NO_WORK)
            fit = fit_at(opened[e.round], fits) if e.round in opened else None
            model_j, calibrated_j = predict_phase(e.device, e.phase, work, fit)
        except ValueError as exc:      # no work to evaluate, or an architecture the model does not know
            unmodelled[str(exc)] = unmodelled.get(str(exc), 0) + 1
        energy.append(EnergyRecord(
            device=e.device, round=e.round, phase=e.phase, joules=float(e.joules),
            joules_above_idle=float(e.joules_above_idle) if e.joules_above_idle is not None else math.nan,
            seconds=float(e.seconds) if e.seconds is not None else math.nan, samples=int(e.samples or 0),
            partial=bool(e.partial), model_joules=model_j, calibrated_joules=calibrated_j))
    notes += [f"{count} energy phase(s) could not be modelled: {why}" for why, count in unmodelled.items()]
    if unusable:
        notes.append(f"{unusable} stored energy phase(s) carry no energy figure and are left out.")
    if fits and energy and all(r.calibrated_joules is None for r in energy):
        notes.append(_why_uncalibrated(fits[-1][1]))

    decisions = [_decision(d) for d in store.decisions(experiment)]
    kept = {(e.device, e.round, e.phase) for e in energy}
    windows = [w for (device, round_), report in sorted(reports.items())
               for w in phase_windows(device, round_, report) if (w.device, w.round, w.phase) in kept]
    rejections = [{"round": r.round, "device": r.device, "kind": r.kind, "reason": r.reason, "detail": r.detail}
                  for r in store.rejections(experiment)]
    return StoreContents(experiment, dict(record.config), rounds, energy, decisions, windows, notes, rejections)


def _why_uncalibrated(fit: Any) -> str:
    """Why the basestation's latest calibration left every phase uncalibrated: its fleet fit's own reasons."""
    parts = [f"{name}: {part.reason}" for name, part in (("computation", fit.fleet.compute),
                                                          ("uplink", fit.fleet.uplink)) if not part.ok]
    return ("The basestation's latest calibration could not fit the model yet"
            + (" (" + "; ".join(parts) + ")." if parts else "."))


def _round(r: Any) -> RoundRecord:
    seconds = (r.closed_at - r.opened_at) if r.closed_at is not None else math.nan
    return RoundRecord(round=r.round, accuracy=math.nan if r.accuracy is None else float(r.accuracy),
                       loss=math.nan if r.loss is None else float(r.loss), bits_n=int(r.n), bits_m=int(r.m),
                       devices_selected=len(r.selected), devices_answered=int(r.accepted), seconds=float(seconds))


def _work(report: dict, plan: dict, device: str, sent_bits: int | None, config: dict) -> Work | None:
    """The work behind an energy report: its own n, m, iterations and minibatch (else the plan's), the
    plan's architecture (else the experiment's), and the bits the device sent."""
    def pick(name: str):
        return report.get(name, plan.get(name))

    m = report.get("m")
    if m is None:
        m = (plan.get("m_per_device") or {}).get(device, plan.get("m"))
    uplink = report.get("uplink")
    size = uplink.get("bytes") if isinstance(uplink, dict) else None
    bits = 8 * int(size) if isinstance(size, int) and not isinstance(size, bool) else sent_bits
    try:
        return Work(n=int(pick("n")), m=int(m), iterations=int(pick("iterations")),
                    batch_size=int(pick("batch_size")), model=str(plan.get("model") or config["model"]),
                    uplink_bits=bits)
    except (KeyError, TypeError, ValueError):
        return None


def _decision(d: Any) -> dict:
    """A decision as one flat row: round, policy, n, m, the scalar parts of its detail and of the
    prediction it was based on (``predicted_energy_j``, ``predicted_rounds``, ...)."""
    row: dict[str, Any] = {"round": d.round, "policy": d.policy, "n": d.n, "m": d.m}
    detail = d.detail or {}
    predicted = detail.get("predicted")
    items = list(detail.items())
    if isinstance(predicted, dict):
        items += [(f"predicted_{key}", value) for key, value in predicted.items()]
    for key, value in items:
        if isinstance(value, (str, int, float, bool)) and key not in row:
            row[key] = value
    return row


def _ground_truth(run_dir: Path, summary: dict, contents: StoreContents) -> tuple[dict[str, float] | None, list[str]]:
    logs = find_ground_truth(run_dir, summary)
    if not logs:
        return None, []
    phases: dict[str, int] = {}
    for e in contents.energy:
        phases[e.device] = phases.get(e.device, 0) + 1
    return ground_truth_energy(logs, contents.windows, phases)
